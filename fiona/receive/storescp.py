"""The receiver daemon (`fiona storescp`; original `storectl.sh start`).

C-STORE and C-ECHO on DICOMIP:DICOMPORT for any called AE title (the called AE is recorded, as
it routes studies to projects). While the first character of the `enabled` file is 0 it refuses
new associations and lets the ones in progress finish.
"""

from __future__ import annotations

import logging
import threading
import time

from ..config import Config, Site, is_enabled
from ..daemon import DaemonError, ready, running
from ..suite import INDEXER, RECEIVER
from ..tree import Tree
from .store import StoreHandler
from .ul import AcceptorServer, Association

log = logging.getLogger(RECEIVER.logger)


class Receiver(StoreHandler):
    """The store handler plus the association log line and the `enabled` switch."""

    def __init__(self, config: Config, site: Site):
        super().__init__(Tree(site.datadir), config.refuse_store_percent,
                         INDEXER.pipe_path(site))
        self.site = site
        self._enabled = True
        self._checked = 0.0

    def on_closed(self, association: Association, how: str) -> None:
        seconds = time.monotonic() - association.started
        level = logging.INFO if how == "released" else logging.WARNING
        log.log(level, "association %s -> %s from %s: %d stored, %d failed, %d bytes, %.2f s, %s",
                association.calling_ae, association.called_ae, association.peer_ip,
                association.stored, association.failed, association.bytes, seconds, how)

    def accepting(self) -> bool:
        """The receive switch of the `enabled` file, read at most once a second."""
        now = time.monotonic()
        if now - self._checked > 1.0:
            self._checked = now
            enabled = is_enabled(self.site.datadir, "receive")
            if enabled != self._enabled:
                log.warning("receiver %s by %s", "enabled" if enabled else "disabled (refusing "
                            "new associations)", self.site.datadir / "config" / "enabled")
            self._enabled = enabled
        return self._enabled


def make_server(config: Config, site: Site) -> tuple[AcceptorServer, Receiver]:
    receiver = Receiver(config, site)
    server = AcceptorServer(site.ip, site.port, receiver, accepting=receiver.accepting)
    server.bind()
    return server, receiver


def run(config: Config, site_name: str | None, verbose: bool = False) -> int:
    """Serve until SIGTERM/SIGINT, then finish the associations in progress."""
    site = config.site(site_name)
    with running(site, RECEIVER.command, verbose) as stop:
        try:
            server, receiver = make_server(config, site)
        except OSError as exc:
            raise DaemonError(f"cannot listen on {site.ip}:{site.port}: {exc.strerror}; is "
                              f"another receiver using DICOMPORT {site.port}? Stop it or "
                              f"choose another port in {config.path}") from None
        log.info("FIONA receiver listening on %s:%d as %s (data under %s)", site.ip,
                 server.port, site.aetitle, site.datadir)
        ready()
        if not receiver.accepting():
            log.warning("the receiver is switched off in %s: associations are refused until "
                        "its first character is 1", site.datadir / "config" / "enabled")
        thread = threading.Thread(target=server.serve_forever, name="storescp-accept",
                                  daemon=True)
        thread.start()
        stop.wait()
        log.info("stopping: finishing associations in progress")
        server.shutdown()
        thread.join(5)
        receiver.close()
    return 0
