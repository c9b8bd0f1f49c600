"""A lean C-STORE requestor on a blocking socket: the `dicom` destination's sender.

pynetdicom runs a reactor thread per association that polls its queues, and every C-STORE
passes its state machine and DIMSE layers: ~3.7 ms of CPU per image in the forwarder, more
than de-identifying it (bench/e2e.py), and its reactor needs a workaround to not lose
responses (`fiona.dicom_client.Checkpoint`). Sending is all the forwarder does on these
associations, so this module does it directly, as the receiver does the other side
(`fiona.receive.ul`): pynetdicom encodes the A-ASSOCIATE-RQ and decodes the answer; the
fixed-format DIMSE command sets and P-DATA framing are done here. Queries (C-FIND, C-ECHO)
stay with pynetdicom.

Every read waits at most the network timeout; a peer that aborts, closes or answers out of
turn ends the association with `Lost`, and the caller resends the file in flight on a new one.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from ..dicom_client import Timeouts
from ..receive.ul import (
    APPLICATION_CONTEXT,
    C_STORE_RQ,
    C_STORE_RSP,
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_DATA,
    PDU_RELEASE_RP,
    PDU_RELEASE_RQ,
    ProtocolError,
    command_us,
    encode_command,
    parse_command,
    peer_max_pdu,
    user_information,
)

#: the largest PDU we take from the peer (its answers are command sets of ~100 bytes)
MAX_PDU_RECEIVED = 1 << 20
#: what we send per P-DATA-TF when the peer sets no limit
UNLIMITED_CHUNK = 1 << 20
STATUS, ERROR_COMMENT = 0x0900, 0x0902
DATASET_PRESENT = 0x0000


class Lost(Exception):
    """The association broke (abort, close, timeout, protocol error): resend elsewhere."""


class Rejected(Exception):
    """The peer rejected the association: `result` 1 permanent, 2 transient; the text says
    who and why, in pynetdicom's words."""

    def __init__(self, result: int, why: str):
        super().__init__(why)
        self.result = result


@dataclass(frozen=True)
class Accepted:
    """An accepted presentation context."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


class StoreAssociation:
    """One established association for C-STORE; not thread-safe (one sender thread each)."""

    def __init__(self, sock: socket.socket, accepted: list[Accepted], peer_max_pdu: int,
                 timeouts: Timeouts):
        self.sock = sock
        self.accepted_contexts = accepted
        self._ids = {(c.abstract_syntax, c.transfer_syntax): c.context_id for c in accepted}
        self.chunk = (peer_max_pdu - 6) if peer_max_pdu else UNLIMITED_CHUNK
        self.timeouts = timeouts
        self.is_established = True
        self._message_id = 0

    @classmethod
    def request(cls, calling: str, host: str, port: int, called: str,
                contexts: list[PresentationContext], timeouts: Timeouts
                ) -> StoreAssociation | None:
        """Associate; None when the peer accepted none of `contexts`. Raises OSError when it
        cannot be reached or does not answer, Rejected when it rejects."""
        contexts = [_numbered(cx, 2 * i + 1) for i, cx in enumerate(contexts)]
        sock = socket.create_connection((host, port), timeout=timeouts.connection)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeouts.acse)
            sock.sendall(_associate_rq(calling, called, contexts))
            pdu_type, body = _read_pdu(sock)
            if pdu_type == PDU_ASSOCIATE_RJ:
                rj = A_ASSOCIATE_RJ()
                rj.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + body)
                why = rj.to_primitive()
                raise Rejected(int(why.result or 0),
                               f"{why.result_str}, {why.source_str}: {why.reason_str}")
            if pdu_type != PDU_ASSOCIATE_AC:
                raise OSError(f"the peer answered the association request with PDU type "
                              f"{pdu_type:#04x}")
            ac = A_ASSOCIATE_AC()
            ac.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + body)
            prim = ac.to_primitive()
        except (ValueError, struct.error, IndexError) as exc:  # an answer pynetdicom cannot read
            sock.close()
            raise OSError(f"unreadable answer to the association request: {exc}") from None
        except BaseException:
            sock.close()
            raise
        proposed = {cx.context_id: str(cx.abstract_syntax) for cx in contexts}
        accepted = [Accepted(cx.context_id, proposed[cx.context_id], str(cx.transfer_syntax[0]))
                    for cx in prim.presentation_context_definition_results_list
                    if cx.result == 0x00 and cx.context_id is not None
                    and cx.context_id in proposed and cx.transfer_syntax]
        assoc = cls(sock, accepted, peer_max_pdu(prim), timeouts)
        if not accepted:
            assoc.release()
            return None
        return assoc

    def send_c_store(self, sop_class: str, sop_instance: str, transfer_syntax: str,
                     dataset: bytes | memoryview) -> tuple[int, str]:
        """Store one data set (encoded in `transfer_syntax`); (status, the peer's
        ErrorComment). Raises Lost when the association broke, KeyError when no context
        was accepted for (sop_class, transfer_syntax)."""
        context_id = self._ids[(sop_class, transfer_syntax)]
        self._message_id = self._message_id % 0xFFFF + 1
        command = encode_command([(0x0002, sop_class), (0x0100, C_STORE_RQ),
                                  (0x0110, self._message_id), (0x0700, 0),
                                  (0x0800, DATASET_PRESENT), (0x1000, sop_instance)])
        try:
            self.sock.settimeout(self.timeouts.network)
            self._send_pdv(context_id, 0x03, command)
            view = memoryview(dataset)
            for start in range(0, max(len(view), 1), self.chunk):
                piece = view[start:start + self.chunk]
                self._send_pdv(context_id, 0x02 if start + self.chunk >= len(view) else 0x00,
                               piece)
            self.sock.settimeout(self.timeouts.dimse)
            response = self._read_command()
        except (OSError, ProtocolError) as exc:
            self._broken()
            raise Lost(str(exc) or type(exc).__name__) from None
        try:
            if command_us(response, 0x0100, "CommandField") != C_STORE_RSP:
                raise ProtocolError("the answer to a C-STORE is not a C-STORE response")
            if command_us(response, 0x0120, "MessageIDBeingRespondedTo") != self._message_id:
                raise ProtocolError("a C-STORE response to another message")
            status = command_us(response, STATUS, "Status")
        except ProtocolError as exc:
            self._broken()
            raise Lost(str(exc)) from None
        comment = response.get(ERROR_COMMENT, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        return status, comment

    def release(self) -> None:
        """A-RELEASE, or an abort when the peer does not answer it in the ACSE timeout."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self.sock.settimeout(self.timeouts.acse)
            self.sock.sendall(struct.pack(">BBIBBBB", PDU_RELEASE_RQ, 0, 4, 0, 0, 0, 0))
            while True:
                pdu_type, _ = _read_pdu(self.sock)
                if pdu_type in (PDU_RELEASE_RP, PDU_ABORT):
                    break
        except (OSError, ProtocolError):
            self._abort()
        finally:
            self.sock.close()

    def abort(self) -> None:
        if self.is_established:
            self.is_established = False
            self._abort()
            self.sock.close()

    # --- plumbing ------------------------------------------------------------------------------
    def _broken(self) -> None:
        self.is_established = False
        self._abort()
        self.sock.close()

    def _abort(self) -> None:
        try:
            self.sock.sendall(struct.pack(">BBIBBBB", PDU_ABORT, 0, 4, 0, 0, 0, 0))
        except OSError:
            pass

    def _send_pdv(self, context_id: int, control: int, data: bytes | memoryview) -> None:
        header = struct.pack(">BBIIBB", PDU_DATA, 0, len(data) + 6, len(data) + 2, context_id,
                             control)
        self.sock.sendmsg([header, data])  # one system call, no copy of the data

    def _read_command(self) -> dict[int, bytes]:
        """The next complete command set (the peer's response)."""
        command = bytearray()
        while True:
            pdu_type, body = _read_pdu(self.sock)
            if pdu_type == PDU_ABORT:
                raise ProtocolError("the peer aborted the association")
            if pdu_type == PDU_RELEASE_RQ:
                raise ProtocolError("the peer asked to release while a C-STORE was open")
            if pdu_type != PDU_DATA:
                raise ProtocolError(f"unexpected PDU type {pdu_type:#04x}")
            pos = 0
            while pos + 6 <= len(body):
                length, _context, control = struct.unpack_from(">IBB", body, pos)
                if length < 2 or pos + 4 + length > len(body):
                    raise ProtocolError("malformed presentation data value")
                if not control & 0x01:
                    raise ProtocolError("a data set where a C-STORE response was due")
                command += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 0x02:
                    return parse_command(bytes(command))


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = _recv_exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBI", head)
    if length > MAX_PDU_RECEIVED:
        raise ProtocolError(f"a PDU of {length} bytes from the peer")
    return pdu_type, _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("the peer closed the connection")
        got += k
    return bytes(buf)


def _numbered(cx: PresentationContext, context_id: int) -> PresentationContext:
    out = PresentationContext()
    out.context_id = context_id
    out.abstract_syntax = cx.abstract_syntax
    out.transfer_syntax = list(cx.transfer_syntax)
    return out


def _associate_rq(calling: str, called: str, contexts: list[PresentationContext]) -> bytes:
    rq = A_ASSOCIATE()
    rq.application_context_name = UID(APPLICATION_CONTEXT)
    rq.calling_ae_title = calling
    rq.called_ae_title = called
    rq.presentation_context_definition_list = contexts
    rq.user_information = user_information(MAX_PDU_RECEIVED)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return bytes(pdu.encode())
