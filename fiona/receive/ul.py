"""A lean DICOM upper-layer acceptor for C-STORE and C-ECHO, one thread per association.

pynetdicom's full state machine polls its queues with sleeps and tops out near 300 images/s in
one process, which is below the clinical PACS it stands beside (see bench/ingest.py). FIONA's
receiver only ever answers storage and verification, so this module drives those two services
directly on a blocking socket: it uses pynetdicom for what is intricate (decoding and encoding
association PDUs), and parses the fixed-format DIMSE command sets itself. Handlers follow
pynetdicom's event-handler style: `on_store(request) -> status`.

Peers may be broken or hostile, so every association runs against deadlines (an ARTIM-like one
for negotiation, one between PDUs and one for each whole PDU: a trickle of bytes cannot hold a
thread), connections above the association limit are refused by short-lived workers so the
accept loop never waits on a peer, and every protocol error ends in an A-ABORT (source: service
provider) or A-ASSOCIATE-RJ and one log line that names what was wrong.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1011.1"  # FIONA's implementation class
IMPLEMENTATION_VERSION = "FIONA_01"

#: transfer syntaxes we can parse enough to file an object; anything else is refused at
#: negotiation time, so the sender can fall back to one of these instead of failing later
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                 "1.2.840.10008.1.2.1.99"}


def storable_transfer_syntax(uid: str) -> bool:
    """Known to pydicom and parsable without decoding pixel data (all encapsulated ones are
    explicit VR little endian; deflated is inflated first)."""
    if uid in _UNCOMPRESSED:
        return True
    u = UID(uid)
    return u.is_transfer_syntax and u.is_compressed


PDU_ASSOCIATE_RQ, PDU_ASSOCIATE_AC, PDU_ASSOCIATE_RJ = 0x01, 0x02, 0x03
PDU_DATA, PDU_RELEASE_RQ, PDU_RELEASE_RP, PDU_ABORT = 0x04, 0x05, 0x06, 0x07
_PDU_NAMES = {PDU_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", PDU_ASSOCIATE_AC: "A-ASSOCIATE-AC",
              PDU_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", PDU_DATA: "P-DATA-TF",
              PDU_RELEASE_RQ: "A-RELEASE-RQ", PDU_RELEASE_RP: "A-RELEASE-RP",
              PDU_ABORT: "A-ABORT"}

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101

STATUS_CANNOT_UNDERSTAND = 0xC000

#: A-ABORT reasons when the service provider (source 2) aborts (PS3.8 Table 9-26)
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_UNRECOGNIZED_PARAMETER, ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 4, 5, 6
ABORT_SOURCE_PROVIDER = 2

#: A-ASSOCIATE-RJ (result, source, diagnostic) and what the log line says about each
Refusal = tuple[int, int, int]
REFUSE_DISABLED: Refusal = (2, 3, 1)  # transient, provider (presentation), temporary congestion
REFUSE_LIMIT: Refusal = (2, 3, 2)  # transient, provider (presentation), local limit exceeded
REFUSE_CONTEXT: Refusal = (1, 1, 2)  # permanent, user, application context not supported
REFUSE_VERSION: Refusal = (1, 2, 2)  # permanent, provider (ACSE), protocol version not supported
REFUSE_NO_REASON: Refusal = (1, 1, 1)  # permanent, user, no reason given
_REFUSAL_TEXT = {REFUSE_DISABLED: "the receiver is switched off (temporary congestion)",
                 REFUSE_LIMIT: "too many associations (local limit exceeded)",
                 REFUSE_CONTEXT: "application context not supported",
                 REFUSE_VERSION: "protocol version not supported",
                 REFUSE_NO_REASON: "no presentation context proposed"}

#: the largest A-ASSOCIATE-RQ read (128 presentation contexts with many syntaxes fit easily)
MAX_ASSOCIATE_RQ = 1 << 20
#: the largest DIMSE command set; real ones are a few hundred bytes
MAX_COMMAND = 64 << 10
#: pynetdicom validates AE titles on decoding (and logs tracebacks for non-ASCII ones); we
#: read them from the raw PDU instead and hand it this in their place
_PLACEHOLDER_AE = b"FIONA-PEER".ljust(16)
#: A-ASSOCIATE-RQ items (PS3.8 9.3.2): application context, presentation context, user
#: information; in a presentation context: abstract and transfer syntax; in user information:
#: maximum length (the only user sub-item we use)
ITEM_APPLICATION, ITEM_CONTEXT, ITEM_USER = 0x10, 0x20, 0x50
ITEM_ABSTRACT, ITEM_TRANSFER, ITEM_MAX_LENGTH = 0x30, 0x40, 0x51
_UID_ITEMS = {ITEM_APPLICATION, ITEM_ABSTRACT, ITEM_TRANSFER}
#: lenient on purpose (leading zeros pass); what pynetdicom is given cannot make it log
_UID_BYTES = re.compile(rb"[0-9.]{1,64}[\x00 ]?")
#: what `printable` escapes: all but printable ASCII, and the backslash
_UNPRINTABLE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")


@dataclass(frozen=True)
class Deadlines:
    """How long a peer may take, in seconds. A blocking read waits at most until the deadline
    of what it is reading, so neither silence nor a trickle of bytes holds a thread longer."""

    negotiation: float = 30.0  #: from TCP accept to the whole A-ASSOCIATE-RQ (like ARTIM)
    idle: float = 90.0  #: between PDUs of an established association
    pdu: float = 60.0  #: for the rest of a PDU once its header has arrived, and for a send
    refusal: float = 5.0  #: to read the A-ASSOCIATE-RQ of a connection above the limit
    linger: float = 2.0  #: after an A-ABORT or A-ASSOCIATE-RJ, for the peer to close first


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted with `reason`."""

    def __init__(self, what: str, reason: int = ABORT_INVALID_PARAMETER):
        super().__init__(what)
        self.reason = reason


class DeadlineExceeded(Exception):
    """The peer was silent or too slow; the association is aborted."""


class PeerClosed(ConnectionError):
    """The peer closed the connection; `got` bytes of the awaited read had arrived."""

    def __init__(self, got: int):
        super().__init__("peer closed the connection")
        self.got = got


def printable(raw: bytes | bytearray) -> str:
    """Bytes from the network (an AE title, a UID) as text that is safe to log and record:
    surrounding spaces dropped (they are padding), every byte outside printable ASCII and the
    backslash (which AE titles and UIDs may not hold) written as \\xNN, so a peer can neither
    forge log lines nor put NULs or terminal controls into them. Valid values pass unchanged."""
    return _UNPRINTABLE.sub(lambda m: b"\\x%02x" % m[0][0], bytes(raw).strip(b" ")).decode("ascii")


@dataclass
class Association:
    """What is known of one association, for handlers and the association log line."""

    calling_ae: str
    called_ae: str
    peer_ip: str
    peer_port: int
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes: int = 0


@dataclass
class StoreRequest:
    """One received C-STORE: the dataset exactly as the sender encoded it (the receive buffer
    itself, handed over without a copy)."""

    association: Association
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes | bytearray
    #: work the handler leaves for after the status has gone to the sender (bookkeeping the
    #: object's durability does not depend on); None: the caller wants it all done on return
    after: list[Callable[[], None]] | None = None


class Handler(Protocol):
    def on_store(self, request: StoreRequest) -> int:
        """Store the object durably; return the DIMSE status for the sender."""

    def on_closed(self, association: Association, how: str) -> None:
        """The association ended (`how`: released, aborted, error text)."""


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (always implicit VR little endian, group 0000) as {element: value}."""
    out = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError(f"DIMSE command set ends inside an element header at byte {pos}")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise ProtocolError(f"malformed DIMSE command set: element ({group:04X},{elem:04X}) "
                                f"at byte {pos - 8}")
        out[elem] = data[pos:pos + length]
        pos += length
    return out


def command_us(cmd: dict[int, bytes], elem: int, name: str) -> int:
    """A required US element of a command set; ProtocolError if absent or not 2 bytes."""
    value = cmd.get(elem)
    if value is None or len(value) != 2:
        raise ProtocolError(f"DIMSE command has no valid {name} (0000,{elem:04X}): "
                            f"{'missing' if value is None else f'{len(value)} bytes'}")
    return struct.unpack("<H", value)[0]


def _ui(value: bytes) -> str:
    """A UID of a command set (escaped: it reaches logs and quarantine records as it came)."""
    return printable(value.rstrip(b"\x00 "))


def encode_command(elements: list[tuple[int, str | int]]) -> bytes:
    """Encode a response command set with its group length (UI strings, US integers)."""
    body = bytearray()
    for elem, value in elements:
        if isinstance(value, int):
            raw = struct.pack("<H", value)
        else:
            raw = value.encode("ascii")
            if len(raw) % 2:
                raw += b"\x00"
        body += struct.pack("<HHI", 0, elem, len(raw)) + raw
    return struct.pack("<HHII", 0, 0, 4, len(body)) + bytes(body)


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _screen_items(data: bytes, pos: int, end: int, where: str, known: set[int] | None
                  ) -> list[tuple[int, bytes]]:
    """The (type, value) items from `pos` to `end` of an association PDU, each checked to fit
    exactly, of a `known` type (any if None), with a UID where one belongs."""
    items = []
    while pos < end:
        if pos + 4 > end:
            raise ProtocolError(f"{where} ends inside an item header at byte {pos}")
        item_type, _, length = struct.unpack_from(">BBH", data, pos)
        start, pos = pos + 4, pos + 4 + length
        if pos > end:
            raise ProtocolError(f"item {item_type:#04x} of {length} bytes overruns its {where} "
                                f"({end - start} bytes left)")
        if known is not None and item_type not in known:
            raise ProtocolError(f"{where} has an item of unrecognized type {item_type:#04x}",
                                ABORT_UNRECOGNIZED_PARAMETER)
        value = data[start:pos]
        if item_type in _UID_ITEMS and not _UID_BYTES.fullmatch(value):
            raise ProtocolError(f"item {item_type:#04x} in {where} is not a UID: "
                                f"'{printable(value[:64])}'")
        if item_type == ITEM_CONTEXT:
            if length < 4:
                raise ProtocolError(f"presentation context item of {length} bytes")
            _screen_items(data, start + 4, pos, "presentation context",
                          {ITEM_ABSTRACT, ITEM_TRANSFER})
        if item_type == ITEM_MAX_LENGTH and known is None and length != 4:
            raise ProtocolError(f"maximum length sub-item of {length} bytes, not 4")
        items.append((item_type, value))
    return items


def _pdu_name(pdu_type: int) -> str:
    return _PDU_NAMES.get(pdu_type, f"PDU type {pdu_type:#04x}")


class AssociationHandler:
    """Runs one accepted TCP connection through negotiation, DIMSE exchanges and release.

    Every way it ends produces one log line: the handler's `on_closed` for an established
    association, a line of this module's logger otherwise."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], handler: Handler,
                 max_pdu: int, deadlines: Deadlines, admission: Callable[[], Refusal | None]):
        self.sock = sock
        self.peer = peer
        self.handler = handler
        self.max_pdu = max_pdu
        self.deadlines = deadlines
        self.admission = admission
        self.started = time.monotonic()
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, transfer syntax)
        self.assoc: Association | None = None
        self.calling_ae = self.called_ae = "?"
        self.peer_max_pdu = 0  # 0: unlimited (PS3.8 D.1)
        self.heard = False  # any byte received at all
        self._timeout = 0.0  # the socket's timeout for reads, as last set

    # --- socket plumbing ---------------------------------------------------------------------
    def _recv_exact(self, n: int, deadline: float, late: str) -> bytearray:
        """n bytes, all by `deadline` (DeadlineExceeded with the text `late` otherwise)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(late)
            # a blocking read may overrun its deadline by 5 % at most; not resetting the
            # socket's timeout before every read keeps syscalls off the hot path
            if not remaining / 2 <= self._timeout <= remaining * 1.05 + 0.01:
                self._timeout = remaining
                self.sock.settimeout(remaining)
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                continue
            if not k:
                raise PeerClosed(got)
            got += k
            self.heard = True
        return buf

    def _read_pdu(self, limit: int, head_by: float, body_by: float | None, late: str
                  ) -> tuple[int, bytearray]:
        """One PDU: its header by `head_by`, its body by `body_by` (default: the PDU deadline
        from the header's arrival). `late` says what was late when `head_by` (or a given
        `body_by`) passes."""
        head = self._recv_exact(6, head_by, late)
        pdu_type, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if pdu_type not in _PDU_NAMES:
            raise ProtocolError(f"unrecognized PDU type {pdu_type:#04x}", ABORT_UNRECOGNIZED_PDU)
        if length > limit:
            raise ProtocolError(f"{_pdu_name(pdu_type)} of {length} bytes exceeds the limit of "
                                f"{limit}")
        if body_by is not None:
            return pdu_type, self._recv_exact(length, body_by, late)
        try:
            return pdu_type, self._recv_exact(length, time.monotonic() + self.deadlines.pdu, "")
        except DeadlineExceeded:
            raise DeadlineExceeded(f"{_pdu_name(pdu_type)} of {length} bytes not complete "
                                   f"after {self.deadlines.pdu:g} s") from None

    def _set_send_timeout(self, seconds: float) -> None:
        if self._timeout != seconds:
            self._timeout = seconds
            self.sock.settimeout(seconds)

    def _send_pdu(self, pdu_type: int, body: bytes) -> None:
        self._set_send_timeout(self.deadlines.pdu)
        self.sock.sendall(struct.pack(">BBI", pdu_type, 0, len(body)) + body)

    def _send_last(self, pdu: bytes) -> None:
        """Send a final PDU (A-ABORT, A-ASSOCIATE-RJ) and give the peer a moment to read it and
        close: closing with unread input would reset the connection and could discard it."""
        try:
            self._set_send_timeout(self.deadlines.linger)
            self.sock.sendall(pdu)
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.deadlines.linger
            while (remaining := deadline - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                if not self.sock.recv(65536):
                    break
        except OSError:
            pass

    def _abort(self, reason: int) -> None:
        self._send_last(struct.pack(">BBIBBBB", PDU_ABORT, 0, 4, 0, 0, ABORT_SOURCE_PROVIDER,
                                    reason))

    # --- association ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            how = self._converse()
        except Exception as exc:  # a bug here must cost one association, never the receiver
            log.exception("association from %s:%d: internal error", *self.peer)
            how = f"aborted: internal error ({type(exc).__name__})"
            self._abort(ABORT_NOT_SPECIFIED)
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
        if self.assoc is not None:
            self.handler.on_closed(self.assoc, how)

    def _converse(self) -> str:
        """Negotiate and serve; what happened, for the association's log line."""
        try:
            if not self._negotiate():
                return "refused"
            return self._serve()
        except ProtocolError as exc:
            self._abort(exc.reason)
            return self._ended(f"aborted: {exc}")
        except DeadlineExceeded as exc:
            self._abort(ABORT_NOT_SPECIFIED)
            return self._ended(f"aborted: {exc}")
        except PeerClosed as exc:
            if not self.heard:
                log.debug("connection from %s:%d closed without a request", *self.peer)
                return "closed"
            return self._ended("connection lost: the peer closed it in the middle of a PDU"
                               if exc.got else "connection lost: the peer closed it without "
                               "A-RELEASE or A-ABORT")
        except OSError as exc:
            return self._ended(f"connection lost: {exc}")

    def _ended(self, how: str) -> str:
        """Log how a connection that never became an association ended (an established one
        is logged by the handler's on_closed)."""
        if self.assoc is None:
            log.warning("association from %s:%d (%s -> %s) %s", self.peer[0], self.peer[1],
                        self.calling_ae, self.called_ae, how)
        return how

    def _negotiate(self) -> bool:
        by = self.started + self.deadlines.negotiation
        pdu_type, body = self._read_pdu(MAX_ASSOCIATE_RQ, by, by, "no complete A-ASSOCIATE-RQ "
                                        f"within {self.deadlines.negotiation:g} s")
        if pdu_type != PDU_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got {_pdu_name(pdu_type)}",
                                ABORT_UNEXPECTED_PDU)
        if len(body) < 68:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its "
                                f"68-byte fixed part")
        self.called_ae, self.calling_ae = printable(body[4:20]), printable(body[20:36])
        if not struct.unpack_from(">H", body)[0] & 1:  # PS3.8 9.3.2: version 1 is bit 0,
            self._refuse(REFUSE_VERSION)  # the only bit to test; other versions' items may
            return False  # differ, so they are not decoded
        outcome = _negotiation(self._screened_rq(body), self.max_pdu)
        refusal = self.admission()
        if refusal is None and outcome.application_context != APPLICATION_CONTEXT:
            refusal = REFUSE_CONTEXT
        if refusal is None and not outcome.proposed:
            refusal = REFUSE_NO_REASON
        if refusal is not None:
            self._refuse(refusal)
            return False
        self.peer_max_pdu = outcome.peer_max_pdu
        self.contexts = dict(outcome.contexts)
        encoded = outcome.ac
        # the AC repeats the request's AE title fields byte for byte (PS3.8 Table 9-17)
        self._set_send_timeout(self.deadlines.pdu)
        self.sock.sendall(encoded[:10] + bytes(body[4:36]) + encoded[42:])
        self.assoc = Association(self.calling_ae, self.called_ae, self.peer[0], self.peer[1],
                                 started=self.started)
        return True

    def _screened_rq(self, body: bytearray) -> bytes:
        """The request's PDU with its items screened, so that pynetdicom (and pydicom under
        it) never sees what makes it raise or log, and reduced to what we use: the AE titles
        replaced (they are taken from the raw PDU), of the user information only the maximum
        length (the peer's other sub-items are extended negotiation that we do not take part
        in, PS3.7 D.3.3)."""
        variable = bytearray()
        for item_type, value in _screen_items(bytes(body), 68, len(body), "A-ASSOCIATE-RQ",
                                              {ITEM_APPLICATION, ITEM_CONTEXT, ITEM_USER}):
            if item_type == ITEM_USER:
                value = b"".join(_item(t, v) for t, v in _screen_items(
                    value, 0, len(value), "user information", None) if t == ITEM_MAX_LENGTH)
            variable += _item(item_type, value)
        raw = bytes(body[:4]) + _PLACEHOLDER_AE * 2 + bytes(body[36:68]) + bytes(variable)
        return struct.pack(">BBI", PDU_ASSOCIATE_RQ, 0, len(raw)) + raw

    def _refuse(self, refusal: Refusal) -> None:
        rj = A_ASSOCIATE()
        rj.result, rj.result_source, rj.diagnostic = refusal
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(rj)
        self._send_last(pdu.encode())
        log.log(logging.INFO if refusal == REFUSE_DISABLED else logging.WARNING,
                "association from %s:%d (%s -> %s) refused: %s", self.peer[0], self.peer[1],
                self.calling_ae, self.called_ae, _REFUSAL_TEXT[refusal])

    # --- DIMSE ---------------------------------------------------------------------------------
    def _serve(self) -> str:
        """P-DATA until release or abort. A message is a command, then (unless the command
        says it has none) a data set, each in fragments on one presentation context; anything
        interleaved is a protocol error, so two messages can never be stored as one."""
        command = bytearray()
        dataset = bytearray()
        cmd: dict[int, bytes] | None = None  # a complete command awaiting its data set
        context = 0  # the presentation context of the message in progress
        limit = self.max_pdu + 64
        idle = f"no PDU for {self.deadlines.idle:g} s"
        while True:
            pdu_type, body = self._read_pdu(limit, time.monotonic() + self.deadlines.idle, None,
                                            idle)
            if pdu_type == PDU_RELEASE_RQ:
                self._send_pdu(PDU_RELEASE_RP, b"\x00\x00\x00\x00")
                if cmd is not None or command or dataset:
                    return "released with a message incomplete (discarded, nothing stored)"
                return "released"
            if pdu_type == PDU_ABORT:
                source, reason = (body[2], body[3]) if len(body) >= 4 else (-1, -1)
                return f"aborted by peer (source {source}, reason {reason})"
            if pdu_type != PDU_DATA:
                raise ProtocolError(f"unexpected {_pdu_name(pdu_type)} in an established "
                                    f"association", ABORT_UNEXPECTED_PDU)
            pos, end = 0, len(body)
            if not end:
                raise ProtocolError("P-DATA-TF without a presentation data value")
            while pos < end:
                if pos + 6 > end:
                    raise ProtocolError(f"P-DATA-TF ends inside a presentation data value "
                                        f"header ({end - pos} of 6 bytes)")
                item_len = struct.unpack_from(">I", body, pos)[0]
                if item_len < 2 or pos + 4 + item_len > end:
                    raise ProtocolError(f"presentation data value of {item_len} bytes does not "
                                        f"fit the {end - pos - 4} bytes left in its P-DATA-TF")
                context_id, control = body[pos + 4], body[pos + 5]
                fragment = memoryview(body)[pos + 6:pos + 4 + item_len]
                pos += 4 + item_len
                if context_id not in self.contexts:
                    raise ProtocolError(f"data on presentation context {context_id}, "
                                        f"which was not accepted")
                started = cmd is not None or command or dataset
                if started and context_id != context:
                    raise ProtocolError(f"a fragment on presentation context {context_id} "
                                        f"while a message on context {context} is incomplete",
                                        ABORT_UNEXPECTED_PARAMETER)
                context = context_id
                if control & 0x01:  # command fragment
                    if cmd is not None:
                        raise ProtocolError("a new command arrived before the data set of the "
                                            "previous one was complete (nothing stored)",
                                            ABORT_UNEXPECTED_PARAMETER)
                    if len(command) + len(fragment) > MAX_COMMAND:
                        raise ProtocolError(f"DIMSE command set exceeds {MAX_COMMAND} bytes")
                    command += fragment
                    if control & 0x02:
                        cmd = parse_command(bytes(command))
                        command.clear()
                        if command_us(cmd, 0x0800, "CommandDataSetType") == NO_DATASET:
                            self._dispatch(cmd, context, b"")
                            cmd = None
                else:
                    if cmd is None:
                        raise ProtocolError("data set fragment before its command was complete"
                                            if command else "data set fragment without a "
                                            "command", ABORT_UNEXPECTED_PARAMETER)
                    dataset += fragment
                    if control & 0x02:
                        complete, dataset = dataset, bytearray()
                        self._dispatch(cmd, context, complete)
                        cmd = None

    def _dispatch(self, cmd: dict[int, bytes], context_id: int, data: bytes | bytearray
                  ) -> None:
        field_ = command_us(cmd, 0x0100, "CommandField")
        message_id = command_us(cmd, 0x0110, "MessageID")
        abstract, transfer_syntax = self.contexts[context_id]
        assert self.assoc is not None
        if field_ == C_ECHO_RQ:
            self._respond(context_id, [(0x0002, abstract), (0x0100, C_ECHO_RSP),
                                       (0x0120, message_id), (0x0800, NO_DATASET), (0x0900, 0)])
            return
        if field_ != C_STORE_RQ:
            raise ProtocolError(f"unsupported DIMSE command {field_:#06x}",
                                ABORT_UNEXPECTED_PARAMETER)
        sop_class = _ui(cmd.get(0x0002, b""))
        sop_instance = _ui(cmd.get(0x1000, b""))
        request = StoreRequest(self.assoc, message_id, sop_class, sop_instance, transfer_syntax,
                               data, after=[])
        try:
            status = self.handler.on_store(request)
        except Exception:  # a handler bug must not take the receiver down with it
            log.exception("store handler failed for %s from %s", sop_instance, self.assoc.peer_ip)
            status = STATUS_CANNOT_UNDERSTAND
        if status in (0x0000,) or 0xB000 <= status <= 0xBFFF:
            self.assoc.stored += 1
            self.assoc.bytes += len(data)
        else:
            self.assoc.failed += 1
        self._respond(context_id, [(0x0002, sop_class), (0x0100, C_STORE_RSP),
                                   (0x0120, message_id), (0x0800, NO_DATASET), (0x0900, status),
                                   (0x1000, sop_instance)])
        for step in request.after or ():  # while the sender already sends the next object
            try:
                step()
            except Exception:
                log.exception("work after storing %s from %s failed", sop_instance,
                              self.assoc.peer_ip)

    def _respond(self, context_id: int, elements: list[tuple[int, str | int]]) -> None:
        """Send a response command, in as many P-DATA-TF PDUs as the peer's maximum PDU length
        asks for (each carries one presentation data value: 6 bytes of header, then data)."""
        command = encode_command(elements)
        room = max(self.peer_max_pdu - 6, 1) if self.peer_max_pdu else len(command)
        for start in range(0, len(command), room):
            piece = command[start:start + room]
            control = 0x03 if start + room >= len(command) else 0x01
            self._send_pdu(PDU_DATA, struct.pack(">IBB", len(piece) + 2, context_id, control)
                           + piece)


@dataclass(frozen=True)
class _Outcome:
    """What a screened A-ASSOCIATE-RQ negotiates to, before admission."""

    application_context: str
    proposed: bool  #: any presentation context proposed
    peer_max_pdu: int  #: 0: unlimited (PS3.8 D.1)
    contexts: dict[int, tuple[str, str]]  #: accepted: id -> (abstract, transfer syntax)
    ac: bytes  #: the A-ASSOCIATE-AC, with placeholder AE titles


@lru_cache(maxsize=16)  # a request is at most MAX_ASSOCIATE_RQ: 16 MiB at worst
def _negotiation(rq_pdu: bytes, max_pdu: int) -> _Outcome:
    """Decode a screened request and answer it. Peers propose the same contexts on every
    association (DCMTK's storescu ~128), and pynetdicom takes ~80 ms of CPU to decode and
    answer them, so identical requests are answered from this cache (errors are not cached)."""
    rq = A_ASSOCIATE_RQ()
    try:
        rq.decode(rq_pdu)
        prim = rq.to_primitive()
        ids = [cx.context_id for cx in prim.presentation_context_definition_list]
    except Exception as exc:
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__}: "
                            f"{str(exc)[:200]!r})") from None
    if len(set(ids)) != len(ids):
        raise ProtocolError("A-ASSOCIATE-RQ proposes a presentation context ID twice")
    contexts: dict[int, tuple[str, str]] = {}
    results = [_negotiate_context(cx, contexts)
               for cx in prim.presentation_context_definition_list]
    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT)
    ac.calling_ae_title = ac.called_ae_title = _PLACEHOLDER_AE.decode()
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    ac.user_information = user_information(max_pdu)
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    return _Outcome(str(prim.application_context_name),
                    bool(prim.presentation_context_definition_list), peer_max_pdu(prim),
                    contexts, pdu.encode())


def user_information(max_pdu: int) -> list:
    """FIONA's user information items of an association request or answer: the largest PDU
    it takes, its implementation class and version."""
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    return [max_len, impl, version]


def peer_max_pdu(prim: A_ASSOCIATE) -> int:
    """The largest PDU the other side takes (0: unlimited, PS3.8 D.1)."""
    return next((int(item.maximum_length_received or 0) for item in prim.user_information
                 if isinstance(item, MaximumLengthNotification)), 0)


def _negotiate_context(rq: PresentationContext, accepted: dict[int, tuple[str, str]]
                       ) -> PresentationContext:
    """Accept verification and every storage-like SOP class (private ones included) with
    the first proposed transfer syntax that we can file without decoding pixel data."""
    out = PresentationContext()
    out.context_id = rq.context_id
    out.abstract_syntax = rq.abstract_syntax
    abstract = str(rq.abstract_syntax)
    proposed = [str(ts) for ts in rq.transfer_syntax]
    if abstract == VERIFICATION:
        usable = [ts for ts in proposed if ts in _UNCOMPRESSED]
    elif _is_storage_like(abstract):
        usable = [ts for ts in proposed if storable_transfer_syntax(ts)]
    else:
        out.transfer_syntax = [proposed[0]] if proposed else []
        out.result = 0x03  # abstract syntax not supported
        return out
    if not usable:
        out.transfer_syntax = [proposed[0]] if proposed else []
        out.result = 0x04  # transfer syntaxes not supported
        return out
    out.transfer_syntax = [usable[0]]
    out.result = 0x00
    accepted[rq.context_id or 0] = (abstract, usable[0])  # decoded: never None
    return out


def _is_storage_like(abstract: str) -> bool:
    """Storage SOP classes, and private or unknown ones (e.g. Siemens CSA non-image): everything
    that pynetdicom does not know as another service (query, retrieve, worklist, ...)."""
    if not UID(abstract).is_valid:
        return False
    return uid_to_service_class(abstract) in (StorageServiceClass, ServiceClass)


class AcceptorServer:
    """Listens on (host, port) and runs each association in its own thread.

    Up to `max_associations` run at once; above that, up to `max_refusing` short-lived workers
    each answer one connection with A-ASSOCIATE-RJ (local limit exceeded) within
    `deadlines.refusal`, and connections beyond even those are closed at once. The accept loop
    itself never reads from a peer, and survives any error in handing a connection on."""

    def __init__(self, host: str, port: int, handler: Handler, *, max_pdu: int = 4 << 20,
                 deadlines: Deadlines = Deadlines(), max_associations: int = 64,
                 max_refusing: int = 16, accepting: Callable[[], bool] = lambda: True):
        self.host, self.port = host, port
        self.handler = handler
        self.max_pdu = max_pdu
        self.deadlines = deadlines
        self.accepting = accepting
        self._active = threading.BoundedSemaphore(max_associations)
        self._refusing = threading.BoundedSemaphore(max_refusing)
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._serving = False  # serve_forever owns (and closes) the listening socket

    def bind(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.adopt(sock)

    def adopt(self, sock: socket.socket) -> None:
        """Serve on a listening socket bound elsewhere (the receiver's worker processes accept
        on the one their parent bound: the kernel hands each connection to one of them)."""
        sock.settimeout(0.5)
        self._sock = sock
        self.port = sock.getsockname()[1]

    def listening_fd(self) -> int:
        """The listening socket's descriptor, for worker processes to `adopt`."""
        assert self._sock is not None
        return self._sock.fileno()

    def _admission(self) -> Refusal | None:
        """None to accept, or the A-ASSOCIATE-RJ to answer with."""
        if not self.accepting() or self._stop.is_set():
            return REFUSE_DISABLED
        return None

    def serve_forever(self) -> None:
        """Accept until `shutdown`, then close the listening socket at once (not after the
        associations in progress), so that a new receiver can bind the port."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        self._serving = True
        try:
            self._accept_until_stopped(self._sock)
        finally:
            with self._lock:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None

    def _accept_until_stopped(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    break
                log.error("accepting a connection failed (%s); trying again", exc)
                self._stop.wait(0.5)  # e.g. out of file descriptors: do not spin
                continue
            try:
                self._hand_on(conn, peer)
            except Exception:  # whatever happens to one connection, keep accepting
                log.exception("could not hand on the connection from %s:%d", *peer[:2])
                conn.close()

    def _hand_on(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._active.acquire(blocking=False):
            self._start(self._active, conn, peer, self.deadlines, self._admission)
        elif self._refusing.acquire(blocking=False):
            self._start(self._refusing, conn, peer,
                        replace(self.deadlines, negotiation=self.deadlines.refusal),
                        lambda: REFUSE_LIMIT)
        else:
            conn.close()
            log.warning("connection from %s:%d closed unread: association limit reached and "
                        "too many refusals in progress", *peer[:2])

    def _start(self, slot: threading.BoundedSemaphore, conn: socket.socket,
               peer: tuple[str, int], deadlines: Deadlines,
               admission: Callable[[], Refusal | None]) -> None:
        def run() -> None:
            try:
                AssociationHandler(conn, peer, self.handler, self.max_pdu, deadlines,
                                   admission).run()
            finally:
                slot.release()
                with self._lock:
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, daemon=True, name=f"assoc-{peer[0]}:{peer[1]}")
        with self._lock:
            self._threads.add(t)
        try:
            t.start()
        except BaseException:
            with self._lock:
                self._threads.discard(t)
            slot.release()
            raise

    def shutdown(self, wait: float = 30.0) -> None:
        """Refuse new associations, let the ones in progress finish (up to `wait` s), close."""
        self._stop.set()
        deadline = time.monotonic() + wait
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if self._sock is not None and not self._serving:
                self._sock.close()
                self._sock = None
