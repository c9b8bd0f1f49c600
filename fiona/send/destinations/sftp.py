"""The `sftp` destination's settings (issue 9 adds its handler here): config.json may already
name one, and its entry is checked like every other kind's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from .base import DestinationSettings, register_settings, setting


@register_settings
@dataclass
class SftpSettings(DestinationSettings):
    """`host`, `port`, `user`, the private `key` file and the `remote_dir` to upload into."""

    kind = "sftp"
    host: str = setting("sftp.example.org")
    user: str = setting("fiona")
    key: str = setting("/data/config/sftp_key")
    remote_dir: str = setting("/incoming")
    port: int = setting(22, 22)

    def problems(self, where: str) -> list[str]:
        errors = [f"{where}.{key} must be a non-empty text, e.g. \"{example}\"; got {value!r}"
                  for key, example, value in (("host", "sftp.example.org", self.host),
                                              ("user", "fiona", self.user),
                                              ("remote_dir", "/incoming", self.remote_dir))
                  if not isinstance(value, str) or not value.strip()]
        if not isinstance(self.key, str) or not PurePosixPath(self.key).is_absolute():
            errors.append(f"{where}.key must be the absolute path of a private key file, e.g. "
                          f"\"/data/config/sftp_key\"; got {self.key!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or \
                not 1 <= self.port <= 65535:
            errors.append(f"{where}.port must be a whole number from 1 to 65535, "
                          f"got {self.port!r}")
        return errors
