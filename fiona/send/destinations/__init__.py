"""Destinations that de-identified studies are forwarded to: one module per kind, one registry.

Each kind (`folder`, `dicom`, `sftp`) is a `Destination` subclass
registered by its config name in `REGISTRY`, with a typed `DestinationSettings` class checked
once, by the same rules at config load (`validate`, called by fiona/config.py) and when a
handler is built (`open_destination`). Every handler offers the same three operations:

- `send(files)`: deliver Part-10 files; per-file refusals come back in `SendResult.failed`
  (SOP Instance UID, or the path when the file has none, and the reason), while a destination
  that cannot be reached raises `DestinationUnavailable` (retry later) and a configuration or
  peer refusal that no retry will cure raises `DestinationError`.
- `count_instances(study_uid)`: what the destination holds of a study, series UID -> number of
  instances, so the sender can verify arrival before marking a request done (SPEC §7 step 6).
- `test_connection()`: C-ECHO, or a probe write.

Sending the same files again is always safe: a folder skips identical files, a DICOM peer
overwrites (or ignores) instances it already has, so a retried request never duplicates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    REGISTRY,
    SETTINGS,
    Destination,
    DestinationError,
    DestinationSettings,
    DestinationUnavailable,
    SendResult,
    validate,
)
from .dicom import CALLING_AE, DicomDestination, DicomSettings
from .folder import FolderDestination, FolderSettings
from .sftp import SftpDestination, SftpSettings

if TYPE_CHECKING:
    from ...config import Config

__all__ = ["CALLING_AE", "REGISTRY", "SETTINGS", "Destination", "DestinationError",
           "DestinationSettings", "DestinationUnavailable", "DicomDestination", "DicomSettings",
           "FolderDestination", "FolderSettings", "SendResult", "SftpDestination",
           "SftpSettings", "open_destination", "validate"]


def open_destination(name: str, config: Config) -> Destination:
    """The handler for DESTINATIONS[name] of `config`."""
    try:
        settings = config.destinations[name]
    except KeyError:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise DestinationError(f"unknown destination {name!r}; DESTINATIONS in {config.path} "
                               f"has: {known}") from None
    kind = settings.get("type")
    handler = REGISTRY.get(kind) if isinstance(kind, str) else None
    if handler is None:
        raise DestinationError(f"destination {name!r} has type {kind!r}, which this FIONA "
                               f"cannot send to (supported: {', '.join(sorted(REGISTRY))})")
    return handler(name, settings)
