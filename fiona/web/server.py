"""`fiona web`: serve the web application with uvicorn on WEB.host:WEB.port.

Plain HTTP on loopback; for other machines put an HTTPS reverse proxy in front (README) and set
`WEB.secure_cookies` (or pass `--https`) so the browser sends the session cookie over HTTPS only.
"""

from __future__ import annotations

import logging
import threading

from ..config import Config
from ..daemon import running
from .users import UserStore


class PathOnlyAccessLog(logging.Filter):
    """uvicorn's access line without the query string (shown with `-v`): Assign's search box puts
    names and IDs into the URL, and no identifier may reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:  # client, method, path, ...
            args = list(record.args)
            args[2] = str(args[2]).split("?", 1)[0]
            record.args = tuple(args)
        return True


def bootstrap_admin(config: Config, site: str | None = None, port: int | None = None) -> None:
    """First start: no users yet -> an `admin` with a one-time password, printed once."""
    datadir = config.site(site).datadir
    password = UserStore(datadir).bootstrap_admin()
    if password:
        from .. import audit
        audit.append(datadir, "fiona", "user added", {"user": "admin", "roles": ["admin"],
                                                       "one_time": True})
        print(f"FIONA web: created user 'admin' with one-time password: {password}\n"
              f"  log in at http://{config.web.get('host')}:{port or config.web.get('port')}/ and "
              f"choose a new password", flush=True)


def run(config: Config, site: str | None = None, verbose: bool = False,
        secure_cookies: bool = False, port: int | None = None) -> int:
    import uvicorn

    from .app import create_app

    bootstrap_admin(config, site, port)
    with running(config.site(site), "web", verbose) as stop:
        logging.getLogger("uvicorn.access").addFilter(PathOnlyAccessLog())
        app = create_app(config, site, secure_cookies=secure_cookies)
        server = uvicorn.Server(uvicorn.Config(
            app, host=config.web.get("host", "127.0.0.1"),
            port=port or int(config.web.get("port", 8080)), log_config=None,
            # X-Forwarded-For is read by the app, from WEB.trusted_proxies only
            proxy_headers=False, server_header=False))
        # uvicorn handles SIGTERM/SIGINT itself while serving, then restores `running`'s; a
        # signal that came before uvicorn took over (during startup) set `stop`: pass it on
        def exit_when_stopped() -> None:
            stop.wait()
            server.should_exit = True
        threading.Thread(target=exit_when_stopped, daemon=True).start()
        server.run()
        stop.set()
    return 0
