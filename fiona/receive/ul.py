"""A lean DICOM upper-layer acceptor for C-STORE and C-ECHO, one thread per association.

pynetdicom's full state machine polls its queues with sleeps and tops out near 300 images/s in
one process, which is below the clinical PACS it stands beside (see bench/ingest.py). FIONA's
receiver only ever answers storage and verification, so this module drives those two services
directly on a blocking socket: it uses pynetdicom for what is intricate (decoding and encoding
association PDUs), and parses the fixed-format DIMSE command sets itself. Handlers follow
pynetdicom's event-handler style: `on_store(request) -> status`.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

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

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101

STATUS_CANNOT_UNDERSTAND = 0xC000


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""


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
    """One received C-STORE: the dataset exactly as the sender encoded it."""

    association: Association
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes


class Handler(Protocol):
    def on_store(self, request: StoreRequest) -> int:
        """Store the object durably; return the DIMSE status for the sender."""

    def on_closed(self, association: Association, how: str) -> None:
        """The association ended (`how`: released, aborted, error text)."""


def _parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (always implicit VR little endian, group 0000) as {element: value}."""
    out = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise ProtocolError("malformed DIMSE command set")
        out[elem] = data[pos:pos + length]
        pos += length
    return out


def _us(value: bytes) -> int:
    return struct.unpack("<H", value[:2])[0]


def _ui(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", errors="replace")


def _encode_command(elements: list[tuple[int, str | int]]) -> bytes:
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


class AssociationHandler:
    """Runs one accepted TCP connection through negotiation, DIMSE exchanges and release."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], handler: Handler,
                 max_pdu: int, timeout: float, accept: Callable[[], tuple[int, int, int] | None]):
        self.sock = sock
        self.peer = peer
        self.handler = handler
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.accept = accept
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, transfer syntax)
        self.assoc: Association | None = None

    # --- socket plumbing ---------------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise ConnectionError("peer closed the connection")
            got += k
        return buf

    def _read_pdu(self, limit: int) -> tuple[int, bytearray]:
        head = self._recv_exact(6)
        pdu_type, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds the negotiated {limit}")
        return pdu_type, self._recv_exact(length)

    def _send_pdu(self, pdu_type: int, body: bytes) -> None:
        self.sock.sendall(struct.pack(">BBI", pdu_type, 0, len(body)) + body)

    def _abort(self) -> None:
        try:
            self._send_pdu(PDU_ABORT, b"\x00\x00\x00\x00")  # source: service user
        except OSError:
            pass

    # --- association ---------------------------------------------------------------------------
    def run(self) -> None:
        how = "released"
        try:
            self.sock.settimeout(self.timeout)
            if not self._negotiate():
                return
            how = self._serve()
        except (ProtocolError, ValueError) as exc:
            how = f"aborted: {exc}"
            self._abort()
        except (ConnectionError, socket.timeout, OSError) as exc:
            how = f"connection lost: {exc}"
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            if self.assoc is not None:
                self.handler.on_closed(self.assoc, how)

    def _negotiate(self) -> bool:
        pdu_type, body = self._read_pdu(1 << 20)
        if pdu_type != PDU_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#x}")
        rq = A_ASSOCIATE_RQ()
        rq.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + bytes(body))
        prim = rq.to_primitive()
        calling = str(prim.calling_ae_title).strip()
        called = str(prim.called_ae_title).strip()
        refusal = self.accept()
        if refusal is None and str(prim.application_context_name) != APPLICATION_CONTEXT:
            refusal = (1, 1, 2)  # permanent, service user, application context not supported
        if refusal is not None:
            self._reject(prim, *refusal)
            log.info("refused association from %s (%s -> %s): %s", self.peer[0], calling, called,
                     refusal)
            return False
        self.assoc = Association(calling, called, self.peer[0], self.peer[1])
        results = [self._negotiate_context(cx) for cx in prim.presentation_context_definition_list]
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT)
        ac.calling_ae_title = prim.calling_ae_title
        ac.called_ae_title = prim.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = self.max_pdu
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        ac.user_information = [max_len, impl, version]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.sock.sendall(pdu.encode())
        return True

    def _negotiate_context(self, rq: PresentationContext) -> PresentationContext:
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
        self.contexts[int(rq.context_id)] = (abstract, usable[0])
        return out

    def _reject(self, prim: A_ASSOCIATE, result: int, source: int, diagnostic: int) -> None:
        rj = A_ASSOCIATE()
        rj.result = result
        rj.result_source = source
        rj.diagnostic = diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(rj)
        self.sock.sendall(pdu.encode())

    # --- DIMSE ---------------------------------------------------------------------------------
    def _serve(self) -> str:
        command = bytearray()
        dataset = bytearray()
        cmd: dict[int, bytes] | None = None
        cmd_context = 0
        limit = self.max_pdu + 64
        while True:
            pdu_type, body = self._read_pdu(limit)
            if pdu_type == PDU_RELEASE_RQ:
                self._send_pdu(PDU_RELEASE_RP, b"\x00\x00\x00\x00")
                return "released"
            if pdu_type == PDU_ABORT:
                return "aborted by peer"
            if pdu_type != PDU_DATA:
                raise ProtocolError(f"unexpected PDU type {pdu_type:#x}")
            pos, end = 0, len(body)
            while pos < end:
                item_len = struct.unpack_from(">I", body, pos)[0]
                if item_len < 2 or pos + 4 + item_len > end:
                    raise ProtocolError("malformed presentation data value item")
                context_id, control = body[pos + 4], body[pos + 5]
                fragment = memoryview(body)[pos + 6:pos + 4 + item_len]
                pos += 4 + item_len
                if context_id not in self.contexts:
                    raise ProtocolError(f"data on presentation context {context_id}, "
                                        f"which was not accepted")
                if control & 0x01:  # command fragment
                    command += fragment
                    if control & 0x02:
                        cmd = _parse_command(bytes(command))
                        cmd_context = context_id
                        command.clear()
                        if _us(cmd.get(0x0800, b"\x01\x01")) == NO_DATASET:
                            self._dispatch(cmd, cmd_context, b"")
                            cmd = None
                else:
                    if cmd is None:
                        raise ProtocolError("data set fragment without a command")
                    dataset += fragment
                    if control & 0x02:
                        self._dispatch(cmd, cmd_context, bytes(dataset))
                        dataset.clear()
                        cmd = None

    def _dispatch(self, cmd: dict[int, bytes], context_id: int, data: bytes) -> None:
        field_ = _us(cmd.get(0x0100, b"\x00\x00"))
        message_id = _us(cmd.get(0x0110, b"\x00\x00"))
        abstract, transfer_syntax = self.contexts[context_id]
        assert self.assoc is not None
        if field_ == C_ECHO_RQ:
            self._respond(context_id, [(0x0002, abstract), (0x0100, C_ECHO_RSP),
                                       (0x0120, message_id), (0x0800, NO_DATASET), (0x0900, 0)])
            return
        if field_ != C_STORE_RQ:
            raise ProtocolError(f"unsupported DIMSE command {field_:#06x}")
        sop_class = _ui(cmd.get(0x0002, b""))
        sop_instance = _ui(cmd.get(0x1000, b""))
        request = StoreRequest(self.assoc, message_id, sop_class, sop_instance, transfer_syntax,
                               data)
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

    def _respond(self, context_id: int, elements: list[tuple[int, str | int]]) -> None:
        command = _encode_command(elements)
        item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
        self._send_pdu(PDU_DATA, item)


def _is_storage_like(abstract: str) -> bool:
    """Storage SOP classes, and private or unknown ones (e.g. Siemens CSA non-image): everything
    that pynetdicom does not know as another service (query, retrieve, worklist, ...)."""
    if not UID(abstract).is_valid:
        return False
    return uid_to_service_class(abstract) in (StorageServiceClass, ServiceClass)


class AcceptorServer:
    """Listens on (host, port) and runs each association in its own thread."""

    def __init__(self, host: str, port: int, handler: Handler, *, max_pdu: int = 4 << 20,
                 timeout: float = 60.0, max_associations: int = 64,
                 accepting: Callable[[], bool] = lambda: True):
        self.host, self.port = host, port
        self.handler = handler
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.max_associations = max_associations
        self.accepting = accepting
        self._active = threading.BoundedSemaphore(max_associations)
        self._threads: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.settimeout(0.5)
        self._sock = sock
        self.port = sock.getsockname()[1]

    def _admission(self) -> tuple[int, int, int] | None:
        """None to accept, or an A-ASSOCIATE-RJ (result, source, diagnostic)."""
        if not self.accepting() or self._stop.is_set():
            return (2, 3, 1)  # transient, provider (presentation), temporary congestion
        return None

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._active.acquire(blocking=False):
                AssociationHandler(conn, peer, self.handler, self.max_pdu, self.timeout,
                                   lambda: (2, 3, 2)).run()  # local limit exceeded
                continue
            t = threading.Thread(target=self._run_one, args=(conn, peer), daemon=True,
                                 name=f"assoc-{peer[0]}:{peer[1]}")
            self._threads.add(t)
            t.start()

    def _run_one(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            AssociationHandler(conn, peer, self.handler, self.max_pdu, self.timeout,
                               self._admission).run()
        finally:
            self._active.release()
            self._threads.discard(threading.current_thread())

    def shutdown(self, wait: float = 30.0) -> None:
        """Refuse new associations, let the ones in progress finish (up to `wait` s), close."""
        self._stop.set()
        deadline = time.monotonic() + wait
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        if self._sock is not None:
            self._sock.close()
            self._sock = None
