"""Destinations that de-identified studies are forwarded to, one handler class per kind.

Modelled on mercure's target types: each kind (`folder`, `dicom`) is a `Destination` subclass
registered by its config name in `REGISTRY`, built from its entry in config.json's DESTINATIONS
by `open_destination`. Every handler offers the same three operations:

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

import logging
import math
import os
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..tree import InvalidValue, atomic_write, ensure_dir, fsync_dir, valid_uid

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

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


class Destination(ABC):
    """One configured destination; `settings` is its DESTINATIONS entry from config.json
    (the "type" key, if present, is ignored)."""

    kind: str = ""

    def __init__(self, name: str, settings: dict[str, Any]):
        self.name = name
        self.settings = dict(settings)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @abstractmethod
    def send(self, files: list[Path], progress: Progress | None = None) -> SendResult:
        """Deliver `files`; `progress(n)` is called with the running number of files handled
        (sent or failed), from any thread."""

    @abstractmethod
    def count_instances(self, study_uid: str) -> dict[str, int]:
        """Series Instance UID -> number of instances of `study_uid` at the destination
        (empty when the destination has none)."""

    @abstractmethod
    def test_connection(self) -> None:
        """Return if the destination works; raise DestinationUnavailable or DestinationError."""

    def _setting(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self.settings.get(key)
        if value is None:
            if required:
                raise DestinationError(f"destination {self.name!r} ({self.kind}) needs the "
                                       f"setting {key!r}")
            return default
        return value


# --------------------------------------------------------------------------------------------
# folder


class FolderDestination(Destination):
    """Files under `<path>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`.

    Each file is written to a temporary name in its series folder, fsynced, renamed (mode 0640,
    folders 0750); the folders are fsynced before `send` returns. The three UIDs come from the
    file and pass `tree.valid_uid` before they become a path, so no value in a file can place
    anything outside `path`. An identical file already in place is left alone; a different one
    with the same name is replaced atomically (as a PACS overwriting an instance would).
    """

    kind = "folder"

    def __init__(self, name: str, settings: dict[str, Any]):
        super().__init__(name, settings)
        path = self._setting("path", required=True)
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise DestinationError(f"destination {name!r}: path must be a folder, e.g. "
                                   f"\"/data/research\"; got {path!r}")
        self.root = Path(path)
        if not self.root.is_absolute():
            raise DestinationError(f"destination {name!r}: path must be absolute; got {path!r}")

    def send(self, files: list[Path], progress: Progress | None = None) -> SendResult:
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        result = SendResult()
        if not files:
            return result
        self._ensure_root()
        touched: set[Path] = set()
        for done, file in enumerate(files, 1):
            file = Path(file)
            ds = None
            try:
                ds = dcmread(file, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                            "SOPInstanceUID"])
                study = valid_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
                series = valid_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
                sop = valid_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            except (InvalidDicomError, InvalidValue, ValueError, EOFError) as exc:
                uid = _uid_of(ds, file)
                result.failed.append((uid, f"{file.name}: {exc}"))
                log.warning("%s: refused %s: %s", self.name, file, exc)
            except FileNotFoundError as exc:
                result.failed.append((str(file), f"file is missing: {exc}"))
            else:
                try:
                    self._store(file, study, series, sop, touched)
                except OSError as exc:
                    raise DestinationUnavailable(
                        f"destination {self.name!r}: cannot write under {self.root}: {exc} "
                        f"({result.sent} of {len(files)} files written)") from exc
                result.sent += 1
            if progress:
                progress(done)
        try:
            for folder in sorted(touched, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(folder)
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: {exc}") from exc
        return result

    def _store(self, file: Path, study: str, series: str, sop: str, touched: set[Path]) -> None:
        data = file.read_bytes()
        study_dir = self.root / study
        series_dir = study_dir / series
        target = series_dir / f"{sop}.dcm"
        # valid_uid admits digits and dots only, with no empty component: belt and braces
        if target.parent.parent.parent != self.root or ".." in target.parts:
            raise InvalidValue(f"{target} is outside {self.root}")
        if not series_dir.is_dir():
            for folder in (study_dir, series_dir):
                if not folder.is_dir():
                    ensure_dir(folder)
                    touched.add(folder.parent)
        try:
            if target.stat().st_size == len(data) and target.read_bytes() == data:
                return  # identical file already delivered
        except FileNotFoundError:
            pass
        atomic_write(target, data)
        touched.add(series_dir)

    def count_instances(self, study_uid: str) -> dict[str, int]:
        study = self.root / valid_uid(study_uid, "StudyInstanceUID")
        counts: dict[str, int] = {}
        try:
            series_dirs = list(study.iterdir())
        except FileNotFoundError:
            return counts
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: {exc}") from exc
        for series in series_dirs:
            if series.name.startswith(".") or not series.is_dir():
                continue
            n = sum(1 for f in series.iterdir()
                    if f.suffix == ".dcm" and not f.name.startswith("."))
            if n:
                counts[series.name] = n
        return counts

    def test_connection(self) -> None:
        self._ensure_root()
        try:
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: cannot write in "
                                         f"{self.root}: {exc}") from exc

    def _ensure_root(self) -> None:
        try:
            if not self.root.is_dir():
                ensure_dir(self.root)
        except OSError as exc:
            raise DestinationUnavailable(f"destination {self.name!r}: cannot create "
                                         f"{self.root}: {exc}") from exc
        if not self.root.is_dir():
            raise DestinationError(f"destination {self.name!r}: {self.root} is not a folder")


def _uid_of(ds: Any, file: Path) -> str:
    try:
        uid = str(ds.SOPInstanceUID).strip()
        return uid[:64] if uid else str(file)
    except Exception:  # no data set, or no SOPInstanceUID in it
        return str(file)


# --------------------------------------------------------------------------------------------
# dicom

CALLING_AE = "FIONA"
MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8: odd IDs 1..255)

_PLAIN = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit VR LE, Implicit VR LE


class _Lost(Exception):
    """The association broke while sending: reconnect and resend from the file in flight."""


@dataclass
class _Item:
    path: Path
    sop_class: str
    sop_uid: str
    ts: str

    @property
    def plain(self) -> bool:
        return self.ts in _PLAIN


class DicomDestination(Destination):
    """A DICOM peer (the research PACS): C-STORE out, C-FIND to verify, C-ECHO to test.

    Settings: `aetitle`, `host`, `port`, optionally `query_aetitle`/`query_port` (default: the
    store ones) and `associations` (1..4 parallel associations, default 2, splitting the files).
    The calling AE title is "FIONA". Each association proposes the files' own transfer syntaxes:
    one presentation context per (SOP class, compressed or other transfer syntax) plus one per
    SOP class with Explicit and Implicit VR Little Endian, at most 128 per association (more
    file kinds take more associations in turn). If the peer refuses a compressed syntax, the
    file is decompressed and sent uncompressed if a decoder is available; otherwise it fails
    with the reason. TCP_NODELAY is set on the socket as soon as it connects (otherwise every
    C-STORE waits ~40 ms for a delayed ACK).

    Connection failures are retried (`connect_attempts`, with back-off); a lost association is
    reopened and the file in flight resent. A peer that stays unreachable raises
    DestinationUnavailable; a rejected association (permanent) raises DestinationError; a
    failure status for one file goes to `SendResult.failed` as "status 0xA700 (...)".
    """

    kind = "dicom"

    connect_attempts = 3
    resend_attempts = 3
    backoff_seconds = 0.5
    connection_timeout = 10.0
    acse_timeout = 30.0
    dimse_timeout = 60.0
    network_timeout = 120.0

    def __init__(self, name: str, settings: dict[str, Any]):
        super().__init__(name, settings)
        self.aetitle = _ae(self._setting("aetitle", required=True), name, "aetitle")
        self.host = self._setting("host", required=True)
        if not isinstance(self.host, str) or not self.host.strip():
            raise DestinationError(f"destination {name!r}: host must be a host name or "
                                   f"address, e.g. \"10.0.0.7\"; got {self.host!r}")
        self.host = self.host.strip()
        self.port = _port(self._setting("port", required=True), name, "port")
        self.query_aetitle = _ae(self._setting("query_aetitle", self.aetitle), name,
                                 "query_aetitle")
        self.query_port = _port(self._setting("query_port", self.port), name, "query_port")
        assocs = self._setting("associations", 2)
        if isinstance(assocs, bool) or not isinstance(assocs, int) or not 1 <= assocs <= 4:
            raise DestinationError(f"destination {name!r}: associations must be 1 to 4; "
                                   f"got {assocs!r}")
        self.associations = assocs

    def __repr__(self) -> str:
        return f"<DicomDestination {self.name!r} {self.aetitle}@{self.host}:{self.port}>"

    # --- send --------------------------------------------------------------------------------
    def send(self, files: list[Path], progress: Progress | None = None) -> SendResult:
        result = SendResult()
        items: list[_Item] = []
        lock = threading.Lock()
        done = 0

        def handled(n: int = 1) -> None:
            nonlocal done
            with lock:
                done += n
                count = done
            if progress:
                progress(count)

        for file in files:
            item, reason = _inspect(Path(file))
            if item is None:
                result.failed.append((str(file), reason))
                handled()
            else:
                items.append(item)
        if not items:
            return result

        # group by kind so each association needs few contexts, then split into contiguous
        # chunks, one per parallel association
        order = {(it.sop_class, it.ts): i for i, it in reversed(list(enumerate(items)))}
        items.sort(key=lambda it: order[(it.sop_class, it.ts)])
        n = max(1, min(self.associations, len(items)))
        size = math.ceil(len(items) / n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]

        def work(chunk: list[_Item]) -> SendResult:
            part = SendResult()
            for batch in _batches(chunk):
                self._send_batch(batch, part, handled)
            return part

        if len(chunks) == 1:
            parts = [work(chunks[0])]
        else:
            with ThreadPoolExecutor(len(chunks), thread_name_prefix=f"send-{self.name}") as pool:
                futures = [pool.submit(work, c) for c in chunks]
                errors = []
                parts = []
                for f in futures:
                    try:
                        parts.append(f.result())
                    except DestinationError as exc:
                        errors.append(exc)
                if errors:
                    # a permanent error (e.g. rejected association) outranks unavailability
                    raise next((e for e in errors if not isinstance(e, DestinationUnavailable)),
                               errors[0])
        for part in parts:
            result.sent += part.sent
            result.failed.extend(part.failed)
        return result

    def _send_batch(self, batch: list[_Item], part: SendResult,
                    handled: Callable[[int], None]) -> None:
        contexts = _contexts(batch)
        remaining = list(batch)
        losses = 0
        while remaining:
            assoc = self._associate(self.aetitle, self.port, contexts)
            if assoc is None:  # accepted, but none of the contexts
                for it in remaining:
                    part.failed.append((it.sop_uid, "the destination accepted no presentation "
                                        f"context for {_name(it.sop_class)} in "
                                        f"{_name(it.ts)}"))
                handled(len(remaining))
                return
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                        for cx in assoc.accepted_contexts}
            progressed = False
            try:
                while remaining:
                    item = remaining[0]
                    reason = self._store(assoc, item, accepted)
                    remaining.pop(0)
                    progressed = True
                    if reason is None:
                        part.sent += 1
                    else:
                        part.failed.append((item.sop_uid, reason))
                        log.warning("%s: %s refused: %s", self.name, item.path, reason)
                    handled(1)
            except _Lost as exc:
                losses = 0 if progressed else losses + 1
                log.warning("%s: association lost (%s); %d files left", self.name, exc,
                            len(remaining))
                if losses >= self.resend_attempts:
                    raise DestinationUnavailable(
                        f"destination {self.name!r} ({self.aetitle}@{self.host}:{self.port}) "
                        f"keeps dropping the association: {exc}") from None
                time.sleep(self.backoff_seconds * (2 ** losses))
            finally:
                _release(assoc)

    def _store(self, assoc, item: _Item, accepted: set[tuple[str, str]]) -> str | None:
        """None when stored, else the reason; raises _Lost when the association broke."""
        from pydicom import dcmread

        try:
            ds = dcmread(item.path)
        except Exception as exc:  # unreadable after all: this file only
            return f"cannot read {item.path.name}: {exc}"
        if not item.plain and (item.sop_class, item.ts) not in accepted:
            if not any((item.sop_class, ts) in accepted for ts in _PLAIN):
                return (f"the destination accepts neither {_name(item.ts)} nor uncompressed "
                        f"data for {_name(item.sop_class)}")
            if not _name_is_compressed(item.ts):
                return f"the destination does not accept {_name(item.ts)}"
            try:
                ds.decompress(generate_instance_uid=False)
            except Exception as exc:
                return (f"the destination does not accept {_name(item.ts)} and the file "
                        f"cannot be decompressed here: {exc}")
        if not _quiesce(assoc):
            raise _Lost("association closed by the peer")
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError as exc:  # association no longer established
            raise _Lost(str(exc)) from None
        except (ValueError, AttributeError) as exc:  # no usable context, cannot encode
            return f"cannot send: {exc}"
        except OSError as exc:
            raise _Lost(str(exc)) from None
        if "Status" not in status:
            raise _Lost("no C-STORE response (peer aborted or timed out)")
        return _store_failure(int(status.Status), status)

    def _associate(self, aetitle: str, port: int, contexts: list, ext_neg: list | None = None,
                   handlers: list | None = None):
        """An established association, None when the peer accepted no context; raises
        DestinationUnavailable / DestinationError. `ext_neg` (e.g. SCP/SCU role selection for
        C-GET) and extra event `handlers` go to the association request."""
        from pynetdicom import AE, evt

        last = "no attempt"
        for attempt in range(self.connect_attempts):
            if attempt:
                time.sleep(self.backoff_seconds * (2 ** (attempt - 1)))
            ae = AE(CALLING_AE)
            ae.connection_timeout = self.connection_timeout
            ae.acse_timeout = self.acse_timeout
            ae.dimse_timeout = self.dimse_timeout
            ae.network_timeout = self.network_timeout
            assoc = ae.associate(self.host, port, contexts=contexts, ae_title=aetitle,
                                 ext_neg=ext_neg,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *(handlers or [])])
            if assoc.is_established:
                if not isinstance(assoc._reactor_checkpoint, _Checkpoint):
                    assoc._reactor_checkpoint = _Checkpoint()
                return assoc
            rsp = assoc.acceptor.primitive
            if assoc.is_rejected and rsp is not None:
                why = f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}"
                if rsp.result == 0x02:  # rejected-transient, e.g. too many associations
                    last = f"association rejected ({why})"
                    continue
                raise DestinationError(
                    f"destination {self.name!r}: {aetitle}@{self.host}:{port} rejected the "
                    f"association from {CALLING_AE}: {why}")
            if rsp is not None and getattr(rsp, "result", None) == 0x00:
                return None  # accepted, but no presentation context
            last = "cannot connect or no answer"
        raise DestinationUnavailable(
            f"destination {self.name!r}: {aetitle}@{self.host}:{port} is unreachable "
            f"({last}, {self.connect_attempts} attempts)")

    # --- verify ------------------------------------------------------------------------------
    def count_instances(self, study_uid: str) -> dict[str, int]:
        from pynetdicom import build_context
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        study = valid_uid(study_uid, "StudyInstanceUID")  # never a wildcard
        assoc = self._associate(self.query_aetitle, self.query_port, [build_context(FIND)])
        if assoc is None:
            raise DestinationError(f"destination {self.name!r}: {self.query_aetitle} does not "
                                   f"accept Study Root C-FIND")
        try:
            return self._series_counts(assoc, study)
        finally:
            _release(assoc)

    def _series_counts(self, assoc, study: str) -> dict[str, int]:
        """`count_instances` on an open association that accepted Study Root C-FIND."""
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = ""
        query.NumberOfSeriesRelatedInstances = ""
        counts: dict[str, int] = {}
        missing: list[str] = []
        for ident in self._find(assoc, query, FIND):
            series = str(ident.get("SeriesInstanceUID", "") or "").strip()
            if not series:
                continue
            n = ident.get("NumberOfSeriesRelatedInstances")
            if n is None or str(n).strip() == "":
                missing.append(series)
            else:
                counts[series] = counts.get(series, 0) + int(n)
        for series in dict.fromkeys(missing):
            counts[series] = self._count_images(assoc, study, series, FIND)
        return {s: n for s, n in counts.items() if n}

    def _count_images(self, assoc, study: str, series: str, model) -> int:
        """Fallback for peers that do not return NumberOfSeriesRelatedInstances."""
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        query.SOPInstanceUID = ""
        return len({str(i.get("SOPInstanceUID", "")).strip()
                    for i in self._find(assoc, query, model)} - {""})

    def _find(self, assoc, query, model):
        if not _quiesce(assoc):
            raise DestinationUnavailable(f"destination {self.name!r}: association lost")
        results = []
        for status, ident in assoc.send_c_find(query, model):
            if "Status" not in status:
                raise DestinationUnavailable(f"destination {self.name!r}: no C-FIND response "
                                             f"(peer aborted or timed out)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if ident is not None:
                    results.append(ident)
            elif code == 0x0000:
                break
            else:
                raise DestinationError(f"destination {self.name!r}: C-FIND failed with "
                                       f"{_status_text(code, status)}")
        return results

    def test_connection(self) -> None:
        from pynetdicom import build_context
        from pynetdicom.sop_class import Verification

        endpoints = [(self.aetitle, self.port)]
        if (self.query_aetitle, self.query_port) != endpoints[0]:
            endpoints.append((self.query_aetitle, self.query_port))
        for aetitle, port in endpoints:
            assoc = self._associate(aetitle, port, [build_context(Verification)])
            if assoc is None:
                raise DestinationError(f"destination {self.name!r}: {aetitle} does not accept "
                                       f"Verification (C-ECHO)")
            try:
                if not _quiesce(assoc):
                    raise DestinationUnavailable(f"destination {self.name!r}: {aetitle} "
                                                 f"closed the association")
                status = assoc.send_c_echo()
            finally:
                _release(assoc)
            if "Status" not in status:
                raise DestinationUnavailable(f"destination {self.name!r}: no C-ECHO response "
                                             f"from {aetitle}@{self.host}:{port}")
            if int(status.Status) != 0:
                raise DestinationError(f"destination {self.name!r}: C-ECHO to {aetitle} "
                                       f"answered {_status_text(int(status.Status), status)}")


class _Checkpoint(threading.Event):
    """Stands in for pynetdicom's `Association._reactor_checkpoint` and knows when the
    association's reactor thread is really blocked on it.

    pynetdicom 3.0 pauses its reactor before each request by clearing the checkpoint and
    waiting for `_is_paused`, but the reactor sets `_is_paused = True` on every loop pass,
    also when the checkpoint is set: if a request starts in that window, the reactor wakes,
    takes the peer's response off the DIMSE queue ("Received unexpected C-STORE service
    message") and the request waits for the DIMSE timeout (pynetdicom issues #842, #875;
    seen here in about one send in three with 4 associations). `_quiesce` waits until the
    reactor is blocked inside `wait`, and `wait` only returns while the checkpoint is set,
    which closes the window.
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocked = False
        self.set()

    def wait(self, timeout: float | None = None) -> bool:
        # threading.Event internals (_cond, _flag); unlike Event.wait, a wake-up whose set()
        # was already undone by clear() goes back to waiting instead of passing
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:  # type: ignore[attr-defined]
            if self._flag:  # type: ignore[attr-defined]
                return True
            self.blocked = True
            try:
                while not self._flag:  # type: ignore[attr-defined]
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)  # type: ignore[attr-defined]
                return True
            finally:
                self.blocked = False


def _quiesce(assoc, timeout: float = 5.0) -> bool:
    """Pause `assoc`'s reactor for the next request; False if the reactor is gone."""
    checkpoint = assoc._reactor_checkpoint
    if not isinstance(checkpoint, _Checkpoint):
        checkpoint = assoc._reactor_checkpoint = _Checkpoint()
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while not checkpoint.blocked:
        if not assoc.is_established or time.monotonic() > deadline:
            checkpoint.set()
            return False
        time.sleep(0.0001)
    return True


def _release(assoc) -> None:
    """Release an association (abort it if it is broken or the peer does not answer)."""
    if assoc.is_established and _quiesce(assoc):
        assoc.release()
    if not assoc.is_released:
        assoc.abort()


def _nodelay(event) -> None:
    """EVT_CONN_OPEN: no Nagle on the association's socket (pynetdicom has no option)."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # e.g. a TLS wrapper without the option
        log.debug("cannot set TCP_NODELAY: %s", exc)


def _inspect(path: Path) -> tuple[_Item | None, str]:
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError as exc:
        return None, f"file is missing: {exc}"
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return None, f"{path.name} is not a DICOM Part-10 file: {exc}"
    values = [str(meta.get(k, "") or "").rstrip("\x00 ") for k in
              ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")]
    if not all(values):
        return None, f"{path.name}: file meta lacks the SOP class, instance or transfer syntax"
    return _Item(path, values[0], values[1], values[2]), ""


def _context_keys(item: _Item) -> list[tuple[str, str | None]]:
    keys: list[tuple[str, str | None]] = [(item.sop_class, None)]  # plain for the SOP class
    if not item.plain:
        keys.append((item.sop_class, item.ts))
    return keys


def _batches(items: list[_Item]) -> list[list[_Item]]:
    """Split items (grouped by kind) so that no batch needs more than MAX_CONTEXTS."""
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    keys: set[tuple[str, str | None]] = set()
    for item in items:
        new = set(_context_keys(item)) - keys
        if current and len(keys) + len(new) > MAX_CONTEXTS:
            batches.append(current)
            current, keys = [], set()
            new = set(_context_keys(item))
        current.append(item)
        keys |= new
    if current:
        batches.append(current)
    return batches


def _contexts(batch: list[_Item]) -> list:
    from pynetdicom import build_context

    keys: dict[tuple[str, str | None], None] = {}
    for item in batch:
        for key in _context_keys(item):
            keys[key] = None
    return [build_context(sop, list(_PLAIN) if ts is None else [ts]) for sop, ts in keys]


def _store_failure(code: int, status) -> str | None:
    from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

    if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
        return None
    return _status_text(code, status)


def _status_text(code: int, status) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    text = f"status 0x{code:04X}"
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (None, ""))[1]
    comment = str(status.get("ErrorComment", "") or "").strip()
    detail = ", ".join(x for x in (meaning, comment) if x)
    return f"{text} ({detail})" if detail else text


def _name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _name_is_compressed(ts: str) -> bool:
    from pydicom.uid import UID

    return UID(ts).is_compressed


def _ae(value: Any, name: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > 16 or any(
            c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise DestinationError(f"destination {name!r}: {key} must be an AE title of 1 to 16 "
                               f"characters without backslashes, e.g. \"RESEARCHPACS\"; "
                               f"got {value!r}")
    return value.strip()


def _port(value: Any, name: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise DestinationError(f"destination {name!r}: {key} must be a TCP port 1-65535, "
                               f"e.g. 4242; got {value!r}")
    return value


# --------------------------------------------------------------------------------------------

REGISTRY: dict[str, type[Destination]] = {
    FolderDestination.kind: FolderDestination,
    DicomDestination.kind: DicomDestination,
}


def open_destination(name: str, config: "Config") -> Destination:
    """The handler for DESTINATIONS[name] of `config`."""
    try:
        settings = config.destinations[name]
    except KeyError:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise DestinationError(f"unknown destination {name!r}; DESTINATIONS in {config.path} "
                               f"has: {known}") from None
    kind = settings.get("type")
    handler = REGISTRY.get(kind)  # type: ignore[arg-type]
    if handler is None:
        raise DestinationError(f"destination {name!r} has type {kind!r}, which this FIONA "
                               f"cannot send to (supported: {', '.join(sorted(REGISTRY))})")
    return handler(name, {k: v for k, v in settings.items() if k != "type"})
