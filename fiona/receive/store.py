"""What happens to one received object: validate, file durably, journal, wake the indexer.

Success is answered only after the file and its receipt (from which its journal line is
recovered after a crash: `receipts`) are on disk. Identifiers become paths only after
`tree.valid_uid`; anything that fails goes to `quarantine/receive/` with a reason and the
sender gets a failure status. Pixel data is never decoded here.
"""

from __future__ import annotations

import errno
import io
import logging
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache, partial
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID

from .. import quarantine
from ..journal import RECEIVED, FileEvent, JournalWriter, WakeupSender
from ..tree import (
    InvalidValue,
    Tree,
    arrival_name,
    ensure_dir,
    modality_prefix,
    safe_name,
    touch,
    valid_uid,
)
from .receipts import Receipts
from .structure import Malformed, scan
from .ul import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, StoreRequest

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
MISMATCH = 0xC001  # SOP Instance UID of command and data set differ

#: study folders remembered (then forgotten all at once)
CACHED_STUDIES = 1024
#: what a data set may arrive as (the receiver hands over its buffer without a copy)
Buffer = bytes | bytearray

#: a statvfs per object costs ~0.1 ms; the watermark is checked again after this long or after
#: this many bytes were filed (the disk cannot fill unseen by more than that)
DISK_CHECK_SECONDS = 0.2
DISK_CHECK_BYTES = 64 << 20

DEFLATED = "1.2.840.10008.1.2.1.99"
_LAST_HEADER_TAG = 0x0020000E  # SeriesInstanceUID: everything we need to file an object
_HEADER_TAGS = {"SOPInstanceUID": 0x00080018, "StudyInstanceUID": 0x0020000D,
                "SeriesInstanceUID": 0x0020000E}


def _stop_after_series(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_HEADER_TAG


def read_header(data: Buffer, transfer_syntax: str) -> dict[str, str | None]:
    """The UIDs that file an object, after checking that the data set is complete (Truncated
    otherwise). The structural walk finds them without pydicom on the hot path; pydicom
    reads the header only of objects whose encoding the walk cannot follow."""
    if transfer_syntax == DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    little = transfer_syntax != "1.2.840.10008.1.2.2"
    found = scan(data, implicit, little, frozenset(_HEADER_TAGS.values()))
    if found is not None:
        return {k: found[t].rstrip(b"\x00 ").decode("ascii", "replace") if t in found else None
                for k, t in _HEADER_TAGS.items()}
    ds = read_dataset(io.BytesIO(data), implicit, little, stop_when=_stop_after_series)
    return {k: ds.get(k) for k in _HEADER_TAGS}


@lru_cache(maxsize=4096)
def _meta_prefix(sop_class: str, transfer_syntax: str, source_ae: str) -> tuple[bytes, bytes]:
    """The file meta header split around the SOP Instance UID, cached per class and sender."""
    marker = "9" * 64
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(marker)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = source_ae
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    encoded = fp.getvalue()
    head, _, tail = encoded.partition(marker.encode())
    # the element length and the group length must follow the real UID's length
    return b"\x00" * 128 + b"DICM" + head, tail


def file_parts(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str,
               data: Buffer) -> list[Buffer]:
    """Part-10 file content in pieces: preamble and file meta group, then the data set as
    received (not joined: a 130 KB copy costs ~0.09 ms in page faults; `os.writev` takes them
    as they are)."""
    head, tail = _meta_prefix(sop_class, transfer_syntax, source_ae)
    uid = sop_instance.encode()
    if len(uid) % 2:
        uid += b"\x00"
    delta = len(uid) - 64
    # patch the group length (UL at offset 140) and the UID element's length field (2 bytes)
    group_len = struct.unpack_from("<I", head, 140)[0] + delta
    head = head[:140] + struct.pack("<I", group_len) + head[144:-2] + struct.pack("<H", len(uid))
    return [head + uid + tail, data]


def file_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str,
               data: Buffer) -> bytes:
    """Part-10 file content: preamble, file meta group, then the data set as received."""
    return b"".join(file_parts(sop_class, sop_instance, transfer_syntax, source_ae, data))


def dataset_part(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a Part-10 file that this receiver wrote."""
    raw = path.read_bytes()
    group_len = struct.unpack_from("<I", raw, 140)[0]
    meta_end = 144 + group_len
    fp = io.BytesIO(raw[132:meta_end])
    meta = read_dataset(fp, False, True)
    return str(meta.TransferSyntaxUID), raw[meta_end:]


@lru_cache(maxsize=1024)  # per object otherwise, and AE titles repeat
def _line_value(value: str) -> str:
    """An AE title as a field of the comma-separated journal and pipe lines."""
    return safe_name(value, default="_").replace(",", "_").replace(" ", "_")


@lru_cache(maxsize=1024)
def _source_ae(calling_ae: str) -> str:
    """The calling AE title as the file meta's Source Application Entity Title."""
    return safe_name(calling_ae, default="UNKNOWN")[:16]


class StoreHandler:
    """The receiver's `on_store`: one instance per site, shared by all associations."""

    def __init__(self, tree: Tree, refuse_store_percent: float, pipe: Path,
                 shared: bool = False, join: bool = False):
        """`shared`, `join`: other processes journal too (`JournalWriter`); a process that
        does not `join` is the first, and recovers what a crash left (`Receipts.recover`)."""
        self.tree = tree.make()
        self.refuse_store_percent = refuse_store_percent
        # durable through the receipts: each line is synced within a second of its object
        self.journal = JournalWriter(tree.journal, RECEIVED, durable=False, shared=shared,
                                     join=join)
        self.receipts = Receipts(self.tree, self.journal)
        if not join:
            self.receipts.recover()
        self.wakeup = WakeupSender(pipe)
        self._folders: dict[str, Path] = {}
        self._disk_ok_until = 0.0  # the watermark check's result holds until then...
        self._unchecked = 0  # ...unless this many bytes were filed since

    def close(self) -> None:
        self.receipts.close()
        self.journal.close()
        self.wakeup.close()

    # --- the handler -------------------------------------------------------------------------
    def on_store(self, req: StoreRequest) -> int:
        if self._disk_full(len(req.dataset)):
            return OUT_OF_RESOURCES
        try:
            sop = valid_uid(req.sop_instance_uid, "SOPInstanceUID (command)")
            header = read_header(req.dataset, req.transfer_syntax)
            ds_sop = valid_uid(header.get("SOPInstanceUID"), "SOPInstanceUID")
            if ds_sop != sop:
                return self._refuse(req, f"SOPInstanceUID of the data set ({ds_sop}) differs from "
                                    f"the command's ({sop})", MISMATCH)
            study = valid_uid(header.get("StudyInstanceUID"), "StudyInstanceUID")
            valid_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_class = valid_uid(req.sop_class_uid, "SOPClassUID (command)")
        except (InvalidValue, Malformed) as exc:
            return self._refuse(req, str(exc), CANNOT_UNDERSTAND)
        except Exception as exc:  # pydicom raises many kinds on malformed bytes
            return self._refuse(req, f"cannot parse the data set as DICOM ({type(exc).__name__}: "
                                f"{str(exc)[:200]})", CANNOT_UNDERSTAND)
        content = file_parts(sop_class, sop, req.transfer_syntax,
                             _source_ae(req.association.calling_ae), req.dataset)
        assoc = req.association
        event = FileEvent(_line_value(assoc.calling_ae), _line_value(assoc.called_ae),
                          assoc.peer_ip, self._folder(study), f"{modality_prefix(sop_class)}.{sop}")
        try:
            journal = self._file(req, study, event, content)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("disk full while storing %s of study %s: free space under %s",
                          sop, study, self.tree.datadir)
                return OUT_OF_RESOURCES
            raise
        announce = partial(self._announce, journal, event, study)
        if req.after is None:
            announce()
        else:
            req.after.append(announce)
        return SUCCESS

    def _announce(self, journal: Callable[[], None] | None, event: FileEvent,
                  study: str) -> None:
        """Journal a stored object, touch its study's arrival file and wake the indexer. The
        receiver's associations run this after the sender has its status (the object is
        durable by then, and its receipt keeps it recoverable until it is journaled), so the
        sender sends its next object meanwhile."""
        try:
            if journal is not None:
                journal()
            touch(self._arrival(event.caller, event.called, event.ip, study))
        except OSError as exc:
            log.error("study %s: %s is stored but its journal line or arrival file could not "
                      "be written (%s); restart the receiver once the cause is fixed: it "
                      "journals what its receipts hold", study, event.name, exc)
            return
        self.wakeup.notify(event.line())

    # --- steps -------------------------------------------------------------------------------
    def _disk_full(self, size: int) -> bool:
        """Above the watermark? Asked of the file system again DISK_CHECK_SECONDS or
        DISK_CHECK_BYTES after it was last below, and every time while it is above."""
        self._unchecked += size
        now = time.monotonic()
        if now < self._disk_ok_until and self._unchecked < DISK_CHECK_BYTES:
            return False
        usage = shutil.disk_usage(self.tree.site)
        percent = 100.0 * usage.used / usage.total if usage.total else 0.0
        if percent < self.refuse_store_percent:
            self._disk_ok_until, self._unchecked = now + DISK_CHECK_SECONDS, 0
            return False
        log.error("refusing to store: disk at %.1f%% >= DISK.refuse_store_percent %.0f%% "
                  "under %s; free disk space there (or raise the watermark in config.json)",
                  percent, self.refuse_store_percent, self.tree.site)
        return True

    def _folder(self, study: str) -> Path:
        """The study's archive folder, made if need be (remembered: paths cost time per image)."""
        folder = self._folders.get(study)
        if folder is None:
            if len(self._folders) > CACHED_STUDIES:
                self._folders.clear()
            folder = self._folders[study] = ensure_dir(self.tree.study_archive(study))
        return folder

    @lru_cache(maxsize=1024)  # noqa: B019 - one handler per process, living as long
    def _arrival(self, caller: str, called: str, ip: str, study: str) -> Path:
        return self.tree.arrived / arrival_name(caller, called, ip, study)

    def _file(self, req: StoreRequest, study: str, event: FileEvent,
              content: list[Buffer], again: bool = False) -> Callable[[], None] | None:
        """File durably under the final name unless it exists; returns the step that journals
        it, if one is left (`Receipts.store`). An identical duplicate is journaled again here;
        an existing file with other content goes to quarantine beside it, never over it."""
        try:
            return self.receipts.store(study, event, content)
        except FileExistsError:
            pass
        except FileNotFoundError:  # the folder was removed (cleanup) since we made it
            if again:
                raise
            self._folders.pop(study, None)
            event = replace(event, study_dir=self._folder(study))
            return self._file(req, study, event, content, again=True)
        final = event.study_dir / event.name
        old_ts, old_data = dataset_part(final)
        if old_ts == req.transfer_syntax and old_data == req.dataset:
            # an identical duplicate: journaled again, as the first may have been lost in a
            # crash before its sender was told "stored" (that is why it sends again)
            self.journal.append(event.line())
            self.journal.sync()
            return None
        quarantine.hold(
            self.tree, "receive", "UID conflict: this SOPInstanceUID is already stored with "
            "different content", {event.name: b"".join(content)},
            self._context(req) | {"existing": str(final)},
            "compare both objects; if the new one should replace the old, move it into the "
            "archive by hand and re-run the indexer")
        return None

    def _context(self, req: StoreRequest) -> dict:
        a = req.association
        return {"calling_ae": a.calling_ae, "called_ae": a.called_ae, "peer_ip": a.peer_ip,
                "sop_instance_uid_command": req.sop_instance_uid[:200],
                "sop_class_uid": req.sop_class_uid[:200], "transfer_syntax": req.transfer_syntax}

    def _refuse(self, req: StoreRequest, reason: str, status: int) -> int:
        name = "object.dcm"
        try:
            content = file_bytes(valid_uid(req.sop_class_uid), "1.2.3", req.transfer_syntax,
                                 "UNKNOWN", req.dataset)
        except InvalidValue:
            name, content = "dataset.bin", bytes(req.dataset)
        quarantine.hold(self.tree, "receive", reason, {name: content}, self._context(req),
                        f"the sender ({req.association.calling_ae} at {req.association.peer_ip}) "
                        f"was told status {status:#06x}; fix the object at its source and send "
                        f"it again")
        return status
