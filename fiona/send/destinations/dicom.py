"""The `dicom` destination: a DICOM peer (the research PACS), C-STORE out, C-FIND to verify.

`_associate` is shared with the Review page's PACS client (`fiona.review.pacs`); the association
plumbing itself is `fiona.dicom_client`.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ...backoff import Schedule, attempts
from ...clock import SYSTEM_CLOCK, Clock
from ...dicom_client import Timeouts, answers, associate, quiesce, release, status_text
from ...receive.ul import ProtocolError
from ...tree import valid_uid
from ..storescu import Lost, Rejected, StoreAssociation
from .base import (
    Destination,
    DestinationError,
    DestinationSettings,
    DestinationUnavailable,
    Progress,
    SendResult,
    register,
    setting,
)

log = logging.getLogger("fiona.send.destinations")
T = TypeVar("T")


@dataclass
class DicomSettings(DestinationSettings):
    """`aetitle`, `host`, `port` of the peer's storage SCP; `query_aetitle`/`query_port` for
    C-FIND (default: the same); `associations` in parallel (1-4); and how the Review page
    samples headers (`review_sample` per series, cached `review_max_age_hours`)."""

    kind = "dicom"
    aetitle: str = setting("RESEARCHPACS")
    host: str = setting("127.0.0.1")
    port: int = setting(4242)
    query_aetitle: str | None = setting("RESEARCHPACS", None)
    query_port: int | None = setting(4242, None)
    associations: int = setting(4, 4)
    review_sample: int = setting(5, 5)
    review_max_age_hours: float = setting(24, 24)

    def problems(self, where: str) -> list[str]:
        errors: list[str] = []
        self.aetitle = _ae(self.aetitle, f"{where}.aetitle", errors)
        if self.query_aetitle is not None:
            self.query_aetitle = _ae(self.query_aetitle, f"{where}.query_aetitle", errors)
        if not isinstance(self.host, str) or not self.host.strip():
            errors.append(f"{where}.host must be a host name or address, e.g. \"10.0.0.7\"; "
                          f"got {self.host!r}")
        else:
            self.host = self.host.strip()
        _whole(self.port, f"{where}.port", 1, 65535, errors)
        if self.query_port is not None:
            _whole(self.query_port, f"{where}.query_port", 1, 65535, errors)
        _whole(self.associations, f"{where}.associations", 1, 4, errors)
        _whole(self.review_sample, f"{where}.review_sample", 1, 100, errors)
        hours = self.review_max_age_hours
        if isinstance(hours, bool) or not isinstance(hours, (int, float)) or \
                not 0.01 <= hours <= 24 * 365:
            errors.append(f"{where}.review_max_age_hours must be a number from 0.01 to "
                          f"{24 * 365}, got {hours!r}")
        return errors


def _ae(value: Any, where: str, errors: list[str]) -> Any:
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > 16 or any(
            c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        errors.append(f"{where} must be an AE title of 1 to 16 characters without "
                      f"backslashes, e.g. \"RESEARCHPACS\"; got {value!r}")
        return value
    return value.strip()


def _whole(value: Any, where: str, lo: int, hi: int, errors: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        errors.append(f"{where} must be a whole number from {lo} to {hi}, got {value!r}")


CALLING_AE = "FIONA"
MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8: odd IDs 1..255)

_PLAIN = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit VR LE, Implicit VR LE


class _Unsendable(Exception):
    """This file cannot go over this association (the text says why); the others can."""


@dataclass
class _Item:
    path: Path
    sop_class: str
    sop_uid: str
    ts: str

    @property
    def plain(self) -> bool:
        return self.ts in _PLAIN


class _Feed:
    """The files of one send, shared by its `workers` associations, each taking the next file
    when it is free.

    A peer may take fewer associations than configured (a PACS limits them per calling AE): a
    worker whose first association fails at the first try while others are open or still
    opening hands its file back (`give_back`) and leaves the rest to them, instead of failing
    the whole send; the last one tries as often as a lone association would. A worker with an
    open association that finds no file left waits while others have not opened theirs yet
    (one may give its file back), so a file given back is always taken again."""

    def __init__(self, files: Iterable[Path], workers: int):
        self._source = iter(files)
        self._cond = threading.Condition()
        self._returned: deque[Path] = deque()
        self._opening = workers   # workers that have not opened an association yet
        self._open = 0            # workers that have
        self.stop = threading.Event()
        #: what the iterator raised (nothing it yields after that is sent)
        self.failed: list[BaseException] = []

    def take(self, opening: bool) -> Path | None:
        """The next file, None when there is none or the send stops; `opening`: the caller has
        not opened an association yet (then None also means it is done)."""
        with self._cond:
            while not self.stop.is_set():
                try:
                    path = self._returned.popleft() if self._returned else next(self._source,
                                                                                None)
                except BaseException as exc:
                    self.failed.append(exc)
                    self.stop.set()
                    self._cond.notify_all()
                    break
                if path is not None:
                    return path
                if opening or not self._opening:
                    break
                self._cond.wait()
            if opening:
                self._opening -= 1
                self._cond.notify_all()
            return None

    def opened(self) -> None:
        """The caller's first association is open."""
        with self._cond:
            self._opening -= 1
            self._open += 1
            self._cond.notify_all()

    def give_back(self, path: Path) -> bool:
        """Hand `path` to the other workers, with an association open or opening, and leave;
        False when the caller is the last one (it keeps the file and tries harder)."""
        with self._cond:
            if not self._open and self._opening < 2:
                return False
            self._returned.append(path)
            self._opening -= 1
            self._cond.notify_all()
            return True

    def halt(self) -> None:
        """Stop every association after the file it is sending."""
        with self._cond:
            self.stop.set()
            self._cond.notify_all()


@register
class DicomDestination(Destination):
    """A DICOM peer (the research PACS): C-STORE out, C-FIND to verify, C-ECHO to test.

    Settings: `aetitle`, `host`, `port`, optionally `query_aetitle`/`query_port` (default: the
    store ones) and `associations` (1..4 parallel associations, default 4, each taking the next
    file when it is free, see `send_stream`; a peer that takes fewer gets the files over those
    it takes). The calling AE title is "FIONA". Each association
    proposes the files' own transfer syntaxes: one presentation context per (SOP class,
    compressed or other transfer syntax) plus one per SOP class with Explicit and Implicit VR
    Little Endian, at most 128 per association (a new kind reopens it with one more). A file in
    an accepted syntax is sent from disk as it is. If the peer refuses a compressed syntax, the
    file is decompressed and sent uncompressed if a decoder is available; otherwise it fails
    with the reason. TCP_NODELAY is set on the socket as soon as it connects (otherwise every
    C-STORE waits ~40 ms for a delayed ACK).

    Connection failures are retried (`connect_attempts`, pauses doubling from `backoff_seconds`
    on `clock`, see `fiona.backoff`); a lost association is reopened and the file in flight
    resent. A peer that stays unreachable raises
    DestinationUnavailable; a rejected association (permanent) raises DestinationError; a
    failure status for one file goes to `SendResult.failed` as "status 0xA700 (...)".
    """

    kind = "dicom"
    settings_class = DicomSettings
    config: DicomSettings

    clock: Clock = SYSTEM_CLOCK
    connect_attempts = 3
    resend_attempts = 3
    backoff_seconds = 0.5
    connection_timeout = 10.0
    acse_timeout = 30.0
    dimse_timeout = 60.0
    network_timeout = 120.0

    def __init__(self, name: str, settings: dict[str, Any] | DicomSettings):
        super().__init__(name, settings)
        c = self.config
        self.aetitle, self.host, self.port = c.aetitle, c.host, c.port
        self.query_aetitle = c.query_aetitle or c.aetitle
        self.query_port = c.query_port or c.port
        self.associations = c.associations

    def _schedule(self) -> Schedule:
        """Pauses between connection attempts and after a lost association: doubling from
        `backoff_seconds`."""
        return Schedule.doubling(self.backoff_seconds, max(self.connect_attempts,
                                                           self.resend_attempts) + 1)

    def __repr__(self) -> str:
        return f"<DicomDestination {self.name!r} {self.aetitle}@{self.host}:{self.port}>"

    # --- send --------------------------------------------------------------------------------
    def send(self, files: list[Path], progress: Progress | None = None) -> SendResult:
        return self.send_stream(files, progress)

    def send_stream(self, files: Iterable[Path], progress: Progress | None = None) -> SendResult:
        """Send `files` as the iterator yields them, over `associations` parallel associations
        that each take the next file when they are free (so a producer such as the
        forwarder's de-identification pool and the network overlap). An exception raised by
        the iterator stops every association after the file it is sending and is raised
        here: nothing the iterator yields after that is sent."""
        feed = _Feed(files, self.associations)
        count_lock = threading.Lock()
        errors: list[BaseException] = []
        done = 0

        def handled(n: int = 1) -> None:
            nonlocal done
            with count_lock:
                done += n
                count = done
            if progress:
                progress(count)

        def work() -> SendResult:
            part = SendResult()
            try:
                self._sender(feed, part, handled)
            except BaseException as exc:
                errors.append(exc)
                feed.halt()
            return part

        if self.associations == 1:
            parts = [work()]
        else:
            with ThreadPoolExecutor(self.associations,
                                    thread_name_prefix=f"send-{self.name}") as pool:
                parts = [f.result() for f in [pool.submit(work)
                                              for _ in range(self.associations)]]
        if feed.failed:
            raise feed.failed[0]
        if errors:  # a permanent error (e.g. rejected association) outranks unavailability
            raise next((e for e in errors if not isinstance(e, DestinationUnavailable)),
                       errors[0])
        result = SendResult()
        for part in parts:
            result.sent += part.sent
            result.failed.extend(part.failed)
        return result

    def _sender(self, feed: _Feed, part: SendResult, handled: Callable[[int], None]) -> None:
        """One association's loop: take a file, store it, until `feed` has no more. The
        association offers the contexts of the kinds seen so far and is reopened with more
        when a new kind comes (from scratch once MAX_CONTEXTS would be passed); a lost one is
        reopened and the file in flight resent. When the first association cannot be opened
        at the first try while others are open or opening (a peer that takes fewer), its file
        goes back to the feed and this loop ends."""
        assoc = None
        keys: set[tuple[str, str | None]] = set()
        accepted: set[tuple[str, str]] = set()
        refused: set[tuple[str, str | None]] = set()  # offered alone, no context accepted
        item: _Item | None = None
        path: Path | None = None
        losses, progressed, first = 0, False, True
        try:
            while True:
                if item is None:
                    path = feed.take(opening=first)
                    if path is None:
                        return
                    item, reason = _inspect(Path(path))
                    if item is None:
                        part.failed.append((str(path), reason))
                        handled(1)
                        continue
                need = set(_context_keys(item))
                if need <= refused:
                    part.failed.append((item.sop_uid, "the destination accepted no "
                                        f"presentation context for {_name(item.sop_class)} in "
                                        f"{_name(item.ts)}"))
                    handled(1)
                    item = None
                    continue
                if assoc is None or not need <= keys:
                    if assoc is not None:
                        assoc.release()
                        assoc = None
                    keys = keys | need if len(keys | need) <= MAX_CONTEXTS else need
                    if first and self.associations > 1:
                        try:  # one try: the peer may be full with the others
                            assoc = self._store_association(_contexts(keys), tries=1)
                        except DestinationUnavailable:
                            if path is not None and feed.give_back(path):
                                log.info("%s: the peer takes no more associations now; "
                                         "sending over the others", self.name)
                                return
                            assoc = self._store_association(_contexts(keys))
                    else:
                        assoc = self._store_association(_contexts(keys))
                    if first:
                        feed.opened()
                        first = False
                    progressed = False
                    if assoc is None:  # accepted, but none of the contexts
                        if keys == need:
                            refused |= need
                        keys = set()  # then offered alone
                        continue
                    accepted = {(cx.abstract_syntax, cx.transfer_syntax)
                                for cx in assoc.accepted_contexts}
                try:
                    refusal = self._store(assoc, item, accepted)
                except Lost as exc:
                    assoc.abort()
                    assoc = None
                    losses = 0 if progressed else losses + 1
                    log.warning("%s: association lost (%s); resending %s", self.name, exc,
                                item.sop_uid)
                    if losses >= self.resend_attempts:
                        raise DestinationUnavailable(
                            f"destination {self.name!r} ({self.aetitle}@{self.host}:"
                            f"{self.port}) keeps dropping the association: {exc}") from None
                    self.clock.sleep(self._schedule().delay(losses))
                    continue
                progressed = True
                if refusal is None:
                    part.sent += 1
                else:
                    part.failed.append((item.sop_uid, refusal))
                    log.warning("%s: %s refused: %s", self.name, item.path, refusal)
                handled(1)
                item = None
        finally:
            if assoc is not None:
                assoc.release()

    def _store(self, assoc: StoreAssociation, item: _Item, accepted: set[tuple[str, str]]
               ) -> str | None:
        """None when stored, else the reason; raises Lost when the association broke. A file
        in a transfer syntax the peer accepted goes as it is on disk (its data set after the
        file meta, nothing decoded); otherwise it is read, decompressed if need be, and
        encoded in an accepted syntax."""
        data: bytes | memoryview
        try:
            if (item.sop_class, item.ts) in accepted:
                ts, data = item.ts, _dataset_bytes(item.path)
            else:
                ts, data = _transcoded(item, accepted)
        except _Unsendable as exc:
            return str(exc)
        except OSError as exc:  # gone or unreadable since it was queued: this file only
            return f"cannot read {item.path.name}: {exc.strerror or exc}"
        status, comment = assoc.send_c_store(item.sop_class, item.sop_uid, ts, data)
        return _store_failure(status, {"ErrorComment": comment})

    def _store_association(self, contexts: list, tries: int | None = None
                           ) -> StoreAssociation | None:
        """An association for C-STORE (`fiona.send.storescu`), None when the peer accepted
        no context; raises like `_associate` (after `tries` attempts, default
        `connect_attempts`)."""
        return self._connect(self.aetitle, self.port, lambda: StoreAssociation.request(
            CALLING_AE, self.host, self.port, self.aetitle, contexts, self._timeouts()), tries)

    def _timeouts(self) -> Timeouts:
        return Timeouts(self.connection_timeout, self.acse_timeout, self.dimse_timeout,
                        self.network_timeout)

    def _associate(self, aetitle: str, port: int, contexts: list, ext_neg: list | None = None,
                   handlers: list | None = None):
        """An established pynetdicom association (queries), None when the peer accepted no
        context; raises DestinationUnavailable / DestinationError. `ext_neg` (e.g. SCP/SCU
        role selection for C-GET) and extra event `handlers` go to the association request."""

        def attempt():
            assoc = associate(CALLING_AE, self.host, port, aetitle, contexts, self._timeouts(),
                              ext_neg, handlers)
            if assoc.is_established:
                return assoc
            rsp = assoc.acceptor.primitive
            if assoc.is_rejected and rsp is not None:
                raise Rejected(rsp.result, f"{rsp.result_str}, {rsp.source_str}: "
                                           f"{rsp.reason_str}")
            if rsp is not None and getattr(rsp, "result", None) == 0x00:
                return None  # accepted, but no presentation context
            raise OSError("cannot connect or no answer")

        return self._connect(aetitle, port, attempt)

    def _connect(self, aetitle: str, port: int, attempt: Callable[[], T | None],
                 tries: int | None = None) -> T | None:
        """`attempt()` until it associates, with pauses (`backoff_seconds`) between tries;
        a transient rejection or no answer is tried again, a permanent rejection raises
        DestinationError, and DestinationUnavailable after `tries` (`connect_attempts`)."""
        last = "no attempt"
        tries = tries or self.connect_attempts
        for _attempt in attempts(self._schedule(), tries, self.clock):
            try:
                return attempt()
            except Rejected as exc:
                if exc.result == 0x02:  # rejected-transient, e.g. too many associations
                    last = f"association rejected ({exc})"
                    continue
                raise DestinationError(
                    f"destination {self.name!r}: {aetitle}@{self.host}:{port} rejected the "
                    f"association from {CALLING_AE}: {exc}") from None
            except (OSError, ProtocolError):
                last = "cannot connect or no answer"
        raise DestinationUnavailable(
            f"destination {self.name!r}: {aetitle}@{self.host}:{port} is unreachable "
            f"({last}, {tries} attempts)")

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
            release(assoc)

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
        if not quiesce(assoc):
            raise DestinationUnavailable(f"destination {self.name!r}: association lost")
        results, code, status = answers(
            assoc.send_c_find(query, model), "C-FIND",
            lambda why: DestinationUnavailable(f"destination {self.name!r}: the peer {why}"))
        if code != 0x0000:
            raise DestinationError(f"destination {self.name!r}: C-FIND failed with "
                                   f"{status_text(code, status)}")
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
                if not quiesce(assoc):
                    raise DestinationUnavailable(f"destination {self.name!r}: {aetitle} "
                                                 f"closed the association")
                status = assoc.send_c_echo()
            finally:
                release(assoc)
            if "Status" not in status:
                raise DestinationUnavailable(f"destination {self.name!r}: no C-ECHO response "
                                             f"from {aetitle}@{self.host}:{port}")
            if int(status.Status) != 0:
                raise DestinationError(f"destination {self.name!r}: C-ECHO to {aetitle} "
                                       f"answered {status_text(int(status.Status), status)}")


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


def _dataset_bytes(path: Path) -> memoryview:
    """The data set of a Part-10 file as it is on disk (after its file meta group)."""
    raw = path.read_bytes()
    if raw[128:136] == b"DICM\x02\x00\x00\x00" and raw[136:138] == b"UL":
        return memoryview(raw)[144 + struct.unpack_from("<I", raw, 140)[0]:]
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:  # no group length first: walk the file meta
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return memoryview(raw)[fh.tell():]


def _transcoded(item: _Item, accepted: set[tuple[str, str]]) -> tuple[str, bytes]:
    """(transfer syntax, data set) of a file the peer does not take as it is: decompressed
    and encoded in an uncompressed syntax it accepted; _Unsendable says why not."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    usable = [ts for ts in _PLAIN if (item.sop_class, ts) in accepted]
    if not usable:
        raise _Unsendable(f"the destination accepts neither {_name(item.ts)} nor uncompressed "
                          f"data for {_name(item.sop_class)}")
    if not item.plain and not _name_is_compressed(item.ts):
        raise _Unsendable(f"the destination does not accept {_name(item.ts)}")
    try:
        ds = dcmread(item.path)
    except Exception as exc:  # unreadable after all: this file only
        raise _Unsendable(f"cannot read {item.path.name}: {exc}") from None
    if not item.plain:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:
            raise _Unsendable(f"the destination does not accept {_name(item.ts)} and the "
                              f"file cannot be decompressed here: {exc}") from None
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = usable[0] == _PLAIN[1]
    write_dataset(fp, ds)
    return usable[0], fp.getvalue()


def _context_keys(item: _Item) -> list[tuple[str, str | None]]:
    keys: list[tuple[str, str | None]] = [(item.sop_class, None)]  # plain for the SOP class
    if not item.plain:
        keys.append((item.sop_class, item.ts))
    return keys


def _contexts(keys: set[tuple[str, str | None]]) -> list:
    """The presentation contexts for (SOP class, transfer syntax or None for plain) keys."""
    from pynetdicom import build_context

    return [build_context(sop, list(_PLAIN) if ts is None else [ts])
            for sop, ts in sorted(keys, key=lambda k: (k[0], k[1] or ""))]


def _store_failure(code: int, status) -> str | None:
    from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

    if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
        return None
    return status_text(code, status)


def _name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _name_is_compressed(ts: str) -> bool:
    from pydicom.uid import UID

    return UID(ts).is_compressed
