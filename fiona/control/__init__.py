"""Control plane backends, found by name (CONTROL_PLANE.type in config.json).

Each entry builds a backend from the validated configuration. Backends are imported only when
chosen, so `requests` is needed only for `redcap`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config, Site
from .base import ControlPlane, ControlPlaneError


def _local(config: Config, site: Site | None = None) -> ControlPlane:
    from .local import LocalControlPlane
    site = site or config.site(None)
    return LocalControlPlane(site.datadir / "site" / "fiona.db")


def _redcap(config: Config, site: Site | None = None) -> ControlPlane:
    from .redcap import RedcapControlPlane
    return RedcapControlPlane.from_config(config.control_plane)


#: CONTROL_PLANE.type -> factory(config, site=None)
BACKENDS: dict[str, Callable[..., ControlPlane]] = {"local": _local, "redcap": _redcap}


def open_control_plane(config: Config, site: Site | None = None) -> ControlPlane:
    """The control plane that config.json names (`local`: the site's `site/fiona.db`, the main
    site's by default; `redcap`: the REDCap API with the tokens file)."""
    kind = config.control_plane.get("type", "local")
    try:
        factory = BACKENDS[kind]
    except KeyError:
        raise ControlPlaneError(f"unknown CONTROL_PLANE.type {kind!r} in {config.path}; "
                                f"known: {', '.join(sorted(BACKENDS))}") from None
    return factory(config, site)
