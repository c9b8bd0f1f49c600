"""Control plane backends, found by name (CONTROL_PLANE.type in config.json).

Each entry builds a backend from the validated configuration. Backends are imported only when
chosen, so `requests` is needed only for `redcap` and `psycopg` only for `postgres`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ..config import Config, Site
from .base import ControlPlane, ControlPlaneError


def claim_holder(config: Config, site: Site) -> str:
    """Who claims requests (`fiona.control.sql`): one name per machine, node and site, so a
    forwarder that restarts takes its own claims back at once, and forwarders on two
    machines sharing one index never share a name."""
    return f"{socket.gethostname()}/{config.node}/{site.name or 'main'}"


def _local(config: Config, site: Site | None = None) -> ControlPlane:
    from .local import LocalControlPlane
    site = site or config.site(None)
    return LocalControlPlane(site.datadir / "site" / "fiona.db",
                             holder=claim_holder(config, site))


def _redcap(config: Config, site: Site | None = None) -> ControlPlane:
    from .redcap import RedcapControlPlane
    return RedcapControlPlane.from_config(config.control_plane)


def _postgres(config: Config, site: Site | None = None) -> ControlPlane:
    from .postgres import PostgresControlPlane
    return PostgresControlPlane.from_config(config.control_plane,
                                            claim_holder(config, site or config.site(None)))


#: CONTROL_PLANE.type -> factory(config, site=None)
BACKENDS: dict[str, Callable[..., ControlPlane]] = {"local": _local, "redcap": _redcap,
                                                    "postgres": _postgres}


#: (config file, site) whose key this process checked against its control plane already
_KEY_CHECKED: set[tuple[str, str]] = set()


def open_control_plane(config: Config, site: Site | None = None) -> ControlPlane:
    """The control plane that config.json names (`local`: the site's `site/fiona.db`, the main
    site's by default; `redcap`: the REDCap API with the tokens file; `postgres`: the database
    of the connection string, password from its 0600 file). Once per process, the
    site's secret.key is checked against the key fingerprint the control plane recorded
    (`fiona.control.region.check_key`): a node with another key than the region's is refused
    before it writes a hash."""
    kind = config.control_plane.get("type", "local")
    try:
        factory = BACKENDS[kind]
    except KeyError:
        raise ControlPlaneError(f"unknown CONTROL_PLANE.type {kind!r} in {config.path}; "
                                f"known: {', '.join(sorted(BACKENDS))}") from None
    control = factory(config, site)
    site = site or config.site(None)
    checked = (str(config.path), site.name)
    key = site.datadir / "config" / "secret.key"
    if checked not in _KEY_CHECKED and key.exists():  # without a key nothing is hashed
        from .keyed import Keyed
        from .region import KeyMismatch, check_key
        try:
            check_key(control, Keyed.from_datadir(site.datadir), str(key))
        except KeyMismatch:
            raise
        except ControlPlaneError:  # unreachable or refusing: callers meet it at their first
            return control         # call, with their own handling; checked the next time
        _KEY_CHECKED.add(checked)
    return control
