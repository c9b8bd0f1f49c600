"""What every destination kind shares: errors, the send result, the handler base class, the
typed settings base class and the registry in which each kind is found by its config name.

Modelled on mercure's target types: each kind (`folder`, `dicom`, ...) is one module with a
`DestinationSettings` subclass (its DESTINATIONS keys as typed fields, checked by `problems`)
and a `Destination` subclass, both registered under the kind's name with `register`. The
settings rules exist once: config.py checks DESTINATIONS through `validate`, and a handler
parses its settings with the same class.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

Progress = Callable[[int], None]


class DestinationError(Exception):
    """A permanent problem: bad settings, a refused association, a failure status for a
    query. Retrying the same request will not help until someone changes something."""


class DestinationUnavailable(DestinationError):
    """The destination cannot be reached now (peer down, timeout, disk full): retry later."""


@dataclass
class SendResult:
    """What `send` achieved: `sent` files are at the destination (including ones that were
    already there), `failed` lists (SOP Instance UID or file path, reason) for the rest."""

    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed


def setting(example: Any, default: Any = MISSING) -> Any:
    """A settings field: `example` is shown in error messages; no `default` means required."""
    return field(default=default, metadata={"example": example})


S = TypeVar("S", bound="DestinationSettings")


@dataclass
class DestinationSettings:
    """The settings of one destination kind: its keys in config.json's DESTINATIONS entry
    (besides "type") are the dataclass fields, declared with `setting`."""

    kind: ClassVar[str] = ""

    def problems(self, where: str) -> list[str]:
        """What is wrong with the values (types, ranges), each naming `where`.KEY; may
        normalise values (e.g. strip blanks). Kinds override it."""
        return []

    @classmethod
    def spec(cls) -> dict[str, tuple[Any, Any]]:
        """key -> (example, default or dataclasses.MISSING when required)."""
        return {f.name: (f.metadata.get("example"), f.default) for f in fields(cls)}

    @classmethod
    def validate(cls: type[S], raw: Any, where: str) -> tuple[S | None, list[str]]:
        """The settings in `raw` (a DESTINATIONS entry; its "type" is ignored), or None and
        every problem found: unknown keys, missing required keys, bad values."""
        spec = cls.spec()
        if not isinstance(raw, dict):
            example = {"type": cls.kind, **{k: e for k, (e, d) in spec.items() if d is MISSING}}
            return None, [f"{where} must be an object, e.g. {json.dumps(example)}"]
        errors = [f"unknown key {where}.{key} (known keys: {', '.join(spec)})"
                  for key in raw if key != "type" and key not in spec]
        for key, (example, default) in spec.items():
            if key not in raw and default is MISSING:
                errors.append(f"missing required key {where}.{key}, e.g. \"{key}\": "
                              f"{json.dumps(example)}")
        if errors:
            return None, errors
        settings = cls(**{k: v for k, v in raw.items() if k in spec})
        errors = settings.problems(where)
        return (None, errors) if errors else (settings, [])

    @classmethod
    def parse(cls: type[S], name: str, raw: dict[str, Any]) -> S:
        """The settings of destination `name`, or DestinationError naming every problem."""
        settings, errors = cls.validate(raw, f"DESTINATIONS.{name}")
        if settings is None:
            raise DestinationError(f"destination {name!r}: " + "; ".join(errors))
        return settings

    def as_config(self) -> dict[str, Any]:
        """The entry as config.json would hold it, defaults filled in."""
        return {"type": self.kind, **asdict(self)}


class Destination(ABC):
    """One configured destination. Subclasses set `settings_class` and read their typed
    settings from `self.config`."""

    kind: ClassVar[str] = ""
    settings_class: ClassVar[type[DestinationSettings]] = DestinationSettings

    def __init__(self, name: str, settings: dict[str, Any] | DestinationSettings):
        self.name = name
        self.config = settings if isinstance(settings, self.settings_class) else \
            self.settings_class.parse(name, dict(settings))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @abstractmethod
    def send(self, files: list[Path], progress: Progress | None = None) -> SendResult:
        """Deliver `files`; `progress(n)` is called with the running number of files handled
        (sent or failed), from any thread."""

    def send_stream(self, files: Iterable[Path], progress: Progress | None = None) -> SendResult:
        """Deliver files as `files` yields them (the forwarder de-identifies while it sends).
        An exception raised by the iterator is raised here and nothing it yields after that
        is sent. By default the files are all taken first, then sent; the dicom kind sends
        each as it comes."""
        return self.send(list(files), progress)

    @abstractmethod
    def count_instances(self, study_uid: str) -> dict[str, int]:
        """Series Instance UID -> number of instances of `study_uid` at the destination
        (empty when the destination has none)."""

    @abstractmethod
    def test_connection(self) -> None:
        """Return if the destination works; raise DestinationUnavailable or DestinationError."""


#: kind -> settings class, for every kind config.json may name
SETTINGS: dict[str, type[DestinationSettings]] = {}
#: kind -> handler, for every kind FIONA can send to
REGISTRY: dict[str, type[Destination]] = {}


def register_settings(cls: type[S]) -> type[S]:
    """Class decorator: DESTINATIONS entries of `cls.kind` are checked by `cls`."""
    SETTINGS[cls.kind] = cls
    return cls


D = TypeVar("D", bound=type[Destination])


def register(cls: D) -> D:
    """Class decorator: `cls` sends to destinations of `cls.kind` (with its settings class)."""
    if cls.settings_class.kind != cls.kind:
        raise TypeError(f"{cls.__name__}: settings of kind {cls.settings_class.kind!r}")
    register_settings(cls.settings_class)
    REGISTRY[cls.kind] = cls
    return cls


def validate(name: str, raw: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """config.py's check of DESTINATIONS[name]: the entry with defaults filled in, or None and
    the problems, each naming DESTINATIONS.name.KEY."""
    where = f"DESTINATIONS.{name}"
    kind = raw.get("type") if isinstance(raw, dict) else None
    cls = SETTINGS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return None, [f"{where}.type must be one of {sorted(SETTINGS)}; got {kind!r}"]
    settings, errors = cls.validate(raw, where)
    return (settings.as_config() if settings is not None else None), errors
