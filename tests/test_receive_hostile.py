"""The receiver's upper layer against broken and hostile peers (issue 12).

The receiver runs in this process (fiona.receive.ul's AcceptorServer with the daemon's own
Receiver on a temporary data tree), so its deadlines can be made small; the peers are raw
sockets sending hand-built PDUs, and pynetdicom or DCMTK where a well-behaved sender is needed.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import subprocess
import threading
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from fiona.bootstrap import init
from fiona.config import load
from fiona.receive.store import dataset_part
from fiona.receive.storescp import Receiver
from fiona.receive.ul import MAX_COMMAND, AcceptorServer, Deadlines, printable
from fiona.tree import Tree
from helpers import dcmtk, free_port, raw_c_store, wait_for

VERIFICATION = "1.2.840.10008.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
ABORT, RJ, AC = 0x07, 0x03, 0x02
#: a safety net for reads, far above every deadline the tests configure; not a measurement
PEER_TIMEOUT = 20.0
#: small deadlines, so that no test waits for the real ones
FAST = Deadlines(negotiation=5.0, idle=5.0, pdu=5.0, refusal=5.0, linger=1.0)


# ------------------------------------------------------------------ the receiver under test

@dataclass
class Running:
    server: AcceptorServer
    receiver: Receiver
    thread: threading.Thread
    tree: Tree

    @property
    def port(self) -> int:
        return self.server.port

    def stored(self) -> list[Path]:
        return sorted(p for p in self.tree.archive.glob("scp_*/*") if not p.name.startswith("."))

    def journal(self) -> str:
        return "".join(p.read_text() for p in self.tree.journal.glob("received.*.log"))


@pytest.fixture
def receiver(tmp_path: Path):
    """A factory: start(deadlines=..., max_associations=..., max_refusing=...) -> Running."""
    started: list[Running] = []

    def start(deadlines: Deadlines = FAST, **limits) -> Running:
        datadir = tmp_path / f"data{len(started)}"
        config = load(str(init(datadir, port=free_port(), ip="127.0.0.1")))
        site = config.site()
        rec = Receiver(config, site)
        server = AcceptorServer("127.0.0.1", 0, rec, deadlines=deadlines,
                                accepting=rec.accepting, **limits)
        server.bind()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running = Running(server, rec, thread, Tree(datadir))
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.shutdown(wait=10)
        running.thread.join(10)
        running.receiver.close()


@pytest.fixture
def lines(caplog):
    """The receiver's log lines (fiona loggers, INFO and above) as they arrive."""
    caplog.set_level(logging.DEBUG)

    def get() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name.startswith("fiona") and r.levelno >= logging.INFO]
    return get


# ------------------------------------------------------------------ a raw peer

def item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def context(cid: int, abstract: str, *syntaxes: str) -> bytes:
    return item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, abstract.encode())
                + b"".join(item(0x40, ts.encode()) for ts in syntaxes))


def user_info(max_pdu: int = 16384, *extra: bytes) -> bytes:
    return item(0x50, item(0x51, struct.pack(">I", max_pdu)) + b"".join(extra))


DEFAULT_ITEMS = (item(0x10, APP_CONTEXT), context(1, VERIFICATION, EXPLICIT_LE),
                 context(3, MR, EXPLICIT_LE), user_info())


def associate_rq(items: tuple[bytes, ...] = DEFAULT_ITEMS, version: int = 1,
                 calling: bytes = b"HOSTILE", called: bytes = b"FIONA") -> bytes:
    return pdu(0x01, struct.pack(">HH", version, 0) + called.ljust(16) + calling.ljust(16)
               + bytes(32) + b"".join(items))


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket) -> tuple[int | None, bytes]:
    """The next PDU, or (None, b"") if the receiver closed the connection."""
    def exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf
    head = exact(6)
    if head is None:
        return None, b""
    body = exact(struct.unpack(">I", head[2:])[0])
    assert body is not None, "the receiver closed the connection inside a PDU"
    return head[0], body


def expect_abort(sock: socket.socket) -> int:
    """Read up to the A-ABORT; it must come from the service provider. Returns its reason."""
    pdu_type, body = read_pdu(sock)
    assert pdu_type == ABORT, f"expected A-ABORT, got {pdu_type}"
    assert body[2] == 2, f"A-ABORT source {body[2]}, not the service provider (2)"
    assert read_pdu(sock) == (None, b""), "the connection stays open after A-ABORT"
    return body[3]


def expect_reject(sock: socket.socket) -> tuple[int, int, int]:
    pdu_type, body = read_pdu(sock)
    assert pdu_type == RJ, f"expected A-ASSOCIATE-RJ, got {pdu_type}"
    return body[1], body[2], body[3]


def established(port: int, rq: bytes | None = None) -> socket.socket:
    sock = connect(port)
    sock.sendall(rq or associate_rq())
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == AC, f"association not accepted ({pdu_type})"
    return sock


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    return pdu(0x04, b"".join(pdvs))


def command(*elements: tuple[int, bytes]) -> bytes:
    """A command set, implicit VR little endian, group 0000, with its group length."""
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def ui(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\x00" * (len(raw) % 2)


def c_store_rq(sop_instance: str, message_id: int = 1) -> bytes:
    return command((0x0002, ui(MR)), (0x0100, us(0x0001)), (0x0110, us(message_id)),
                   (0x0700, us(0)), (0x0800, us(0x0000)), (0x1000, ui(sop_instance)))


def c_echo_rq(message_id: int = 1) -> bytes:
    return command((0x0002, ui(VERIFICATION)), (0x0100, us(0x0030)), (0x0110, us(message_id)),
                   (0x0800, us(0x0101)))


def dataset(sop_instance: str, study: str = "1.2.826.0.1.3680043.8.498.10",
            series: str = "1.2.826.0.1.3680043.8.498.11") -> bytes:
    ds = Dataset()
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = sop_instance
    ds.Modality = "MR"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = 1
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def parse_command(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(data):
        _, elem, length = struct.unpack_from("<HHI", data, pos)
        out[elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out


def outcome(lines, fragment: str) -> str:
    """Wait for the one log line that tells how the connection ended, and return it."""
    return wait_for(lambda: next((ln for ln in lines() if fragment in ln), None), PEER_TIMEOUT,
                    f"a log line with {fragment!r}")


def echo_works(port: int) -> bool:
    res = subprocess.run([dcmtk("echoscu"), "-to", "10", "127.0.0.1", str(port)],
                         capture_output=True, timeout=60)
    return res.returncode == 0


# ------------------------------------------------------------------ 1: the accept loop survives

def test_malformed_request_above_the_limit_does_not_kill_the_accept_loop(receiver, lines):
    rx = receiver(max_associations=1)
    with closing(established(rx.port)) as holder:  # the one association slot is taken
        for payload in (associate_rq(DEFAULT_ITEMS + (item(0x77, b"??"),)),
                        associate_rq(DEFAULT_ITEMS[:3] + (item(0x50, item(0x51, b"\x00")),))):
            with closing(connect(rx.port)) as sock:
                sock.sendall(payload)
                expect_abort(sock)
        with closing(connect(rx.port)) as sock:  # a well-formed one is refused, not dropped
            sock.sendall(associate_rq())
            assert expect_reject(sock) == (2, 3, 2)
        holder.sendall(pdu(0x05, bytes(4)))
        assert read_pdu(holder)[0] == 0x06
    assert rx.thread.is_alive()
    wait_for(lambda: echo_works(rx.port), 30, "an echo once the slot is free")
    assert any("unrecognized type 0x77" in ln for ln in lines())


# ------------------------------------------------------------------ 2: idle and slow peers

def test_idle_connections_above_the_limit_do_not_block_other_senders(receiver, lines):
    rx = receiver(Deadlines(negotiation=60, idle=60, pdu=60, refusal=60, linger=1),
                  max_associations=2, max_refusing=2)
    idle = [connect(rx.port) for _ in range(3)]  # 2 slots and one refusal worker, all waiting
    try:
        wait_for(lambda: len(rx.server._threads) == 3, PEER_TIMEOUT, "three workers")
        with closing(connect(rx.port)) as sock:  # answered at once, not after 60 s
            sock.sendall(associate_rq())
            assert expect_reject(sock) == (2, 3, 2)
        outcome(lines, "refused: too many associations")
        idle.append(connect(rx.port))  # takes the second refusal worker
        wait_for(lambda: len(rx.server._threads) == 4, PEER_TIMEOUT, "four workers")
        with closing(connect(rx.port)) as sock:  # refusal workers all busy: closed unread
            assert read_pdu(sock) == (None, b"")
        outcome(lines, "closed unread")
    finally:
        for sock in idle:
            sock.close()
    assert rx.thread.is_alive()


def test_silent_peer_is_aborted_at_the_negotiation_deadline(receiver, lines):
    rx = receiver(Deadlines(negotiation=0.3, idle=60, pdu=60, refusal=60, linger=1))
    with closing(connect(rx.port)) as sock:
        expect_abort(sock)
    assert "no complete A-ASSOCIATE-RQ within 0.3 s" in outcome(lines, "aborted")
    wait_for(lambda: not rx.server._threads, PEER_TIMEOUT, "the slot to be freed")


def trickle(sock: socket.socket, data: bytes, pause: float = 0.05) -> None:
    """Send one byte at a time until the receiver says something (or the data runs out)."""
    for byte in data:
        if select.select([sock], [], [], pause)[0]:
            return
        sock.sendall(bytes([byte]))


def test_trickled_request_is_aborted_at_the_negotiation_deadline(receiver, lines):
    rx = receiver(Deadlines(negotiation=0.3, idle=60, pdu=60, refusal=60, linger=1))
    with closing(connect(rx.port)) as sock:
        trickle(sock, associate_rq() * 10)
        expect_abort(sock)
    assert "no complete A-ASSOCIATE-RQ" in outcome(lines, "aborted")


def test_trickled_pdu_is_aborted_at_the_pdu_deadline(receiver, lines):
    rx = receiver(Deadlines(negotiation=60, idle=60, pdu=0.3, refusal=60, linger=1))
    with closing(established(rx.port)) as sock:
        sock.sendall(struct.pack(">BBI", 0x04, 0, 10000))
        trickle(sock, bytes(10000))
        expect_abort(sock)
    assert "P-DATA-TF of 10000 bytes not complete after 0.3 s" in outcome(lines, "aborted")


def test_idle_association_is_aborted(receiver, lines):
    rx = receiver(Deadlines(negotiation=60, idle=0.3, pdu=60, refusal=60, linger=1))
    with closing(established(rx.port)) as sock:
        expect_abort(sock)
    line = outcome(lines, "association HOSTILE -> FIONA")
    assert "aborted: no PDU for 0.3 s" in line


# ------------------------------------------------------------------ 3: malformed requests

MALFORMED_RQ = {
    # name: (PDU bytes, expected A-ABORT reason or A-ASSOCIATE-RJ triple, log fragment)
    "unknown item type": (associate_rq(DEFAULT_ITEMS + (item(0x77, b"??"),)), 4,
                          "unrecognized type 0x77"),
    "unknown sub-item in a context": (associate_rq((DEFAULT_ITEMS[0], item(0x20, bytes(4) + item(
        0x30, MR.encode()) + item(0x66, b"x")), DEFAULT_ITEMS[3])), 4, "unrecognized type 0x66"),
    "cut maximum length": (associate_rq(DEFAULT_ITEMS[:3] + (item(0x50, item(0x51, b"\x00")),)),
                           6, "maximum length sub-item of 1 bytes"),
    "abstract syntax not a UID": (associate_rq((DEFAULT_ITEMS[0], item(0x20, bytes([1, 0, 0, 0])
                                                + item(0x30, b"1.2.\xff\x00\n")
                                                + item(0x40, EXPLICIT_LE.encode())),
                                                DEFAULT_ITEMS[3])),
                                  6, "item 0x30 in presentation context is not a UID: "
                                  "'1.2.\\xff\\x00\\x0a'"),
    "application context not a UID": (associate_rq((item(0x10, b"x" * 70),) + DEFAULT_ITEMS[1:]),
                                      6, "item 0x10 in A-ASSOCIATE-RQ is not a UID"),
    "item header cut": (associate_rq(DEFAULT_ITEMS + (b"\x10\x00",)), 6,
                        "ends inside an item header"),
    "short fixed part": (pdu(0x01, bytes(40)), 6, "shorter than its 68-byte fixed part"),
    "item overruns": (associate_rq((item(0x10, APP_CONTEXT), b"\x20\x00\xff\xff\x01\x00"
                                    b"\x00\x00", user_info())), 6, "item 0x20 of 65535 bytes "
                      "overruns its A-ASSOCIATE-RQ"),
    "context ID twice": (associate_rq(DEFAULT_ITEMS[:2] + DEFAULT_ITEMS[1:]), 6,
                         "presentation context ID twice"),
    "P-DATA first": (p_data(pdv(1, 3, c_echo_rq())), 2, "expected A-ASSOCIATE-RQ, got P-DATA-TF"),
    "unknown PDU type": (pdu(0x09, bytes(10)), 1, "unrecognized PDU type 0x09"),
    "huge PDU": (struct.pack(">BBI", 0x01, 0, 0x7FFFFFFF), 6, "exceeds the limit"),
    "protocol version 2": (associate_rq(version=2), (1, 2, 2), "protocol version not supported"),
    "version 2 with other items": (associate_rq(DEFAULT_ITEMS + (item(0x77, b"?"),), version=2),
                                   (1, 2, 2), "protocol version not supported"),
    "no application context": (associate_rq(DEFAULT_ITEMS[1:]), (1, 1, 2),
                               "application context not supported"),
    "other application context": (associate_rq((item(0x10, b"1.2.3"),) + DEFAULT_ITEMS[1:]),
                                  (1, 1, 2), "application context not supported"),
    "no presentation context": (associate_rq((DEFAULT_ITEMS[0], DEFAULT_ITEMS[3])), (1, 1, 1),
                                "no presentation context proposed"),
}


@pytest.mark.parametrize("name", list(MALFORMED_RQ))
def test_malformed_request_gets_abort_or_reject_and_one_log_line(receiver, lines, caplog,
                                                                 name):
    payload, expected, fragment = MALFORMED_RQ[name]
    rx = receiver()
    with closing(connect(rx.port)) as sock:
        port = sock.getsockname()[1]
        sock.sendall(payload)
        if isinstance(expected, tuple):
            assert expect_reject(sock) == expected
        else:
            assert expect_abort(sock) == expected
    line = outcome(lines, f":{port} ")
    assert fragment in line
    wait_for(lambda: not rx.server._threads, PEER_TIMEOUT, "the worker to finish")
    assert len([ln for ln in lines() if f":{port} " in ln]) == 1, lines()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and not r.name.startswith("fiona")], "pynetdicom or pydicom logged"
    assert rx.thread.is_alive()


def test_extended_negotiation_sub_items_are_ignored(receiver):
    rq = associate_rq(DEFAULT_ITEMS[:3] + (user_info(16384, item(0x5F, b"x"), item(
        0x54, struct.pack(">H", 3) + b"1.2" + b"\x01\x01"), item(0x52, b"1.2.3")),))
    with closing(established(receiver().port, rq)) as sock:
        sock.sendall(pdu(0x05, bytes(4)))
        assert read_pdu(sock)[0] == 0x06


# ------------------------------------------------------------------ 3, 4, 6: DIMSE level

MALFORMED_DATA = {
    "2-byte P-DATA": (pdu(0x04, b"\x00\x00"), 6, "ends inside a presentation data value header"),
    "empty P-DATA": (pdu(0x04, b""), 6, "without a presentation data value"),
    "PDV overruns": (pdu(0x04, struct.pack(">IBB", 100, 1, 3) + bytes(10)), 6, "does not fit"),
    "zero-length CommandField": (p_data(pdv(1, 3, command((0x0100, b""), (0x0110, us(1)),
                                                          (0x0800, us(0x0101))))),
                                 6, "no valid CommandField (0000,0100): 0 bytes"),
    "no CommandDataSetType": (p_data(pdv(1, 3, command((0x0100, us(0x30)), (0x0110, us(1))))),
                              6, "no valid CommandDataSetType"),
    "command cut in a header": (p_data(pdv(1, 3, c_echo_rq() + b"\x00\x00")), 6,
                                "ends inside an element header"),
    "unaccepted context": (p_data(pdv(5, 3, c_echo_rq())), 6, "context 5, which was not accepted"),
    "data set without command": (p_data(pdv(3, 2, dataset("1.2.3"))), 5,
                                 "data set fragment without a command"),
    "A-ASSOCIATE-RQ again": (associate_rq(), 2, "unexpected A-ASSOCIATE-RQ"),
    "unsupported command": (p_data(pdv(1, 3, command((0x0100, us(0x0020)), (0x0110, us(1)),
                                                     (0x0800, us(0x0101))))),
                            5, "unsupported DIMSE command 0x0020"),
}


@pytest.mark.parametrize("name", list(MALFORMED_DATA))
def test_malformed_p_data_is_aborted_with_one_log_line(receiver, lines, name):
    payload, reason, fragment = MALFORMED_DATA[name]
    rx = receiver()
    with closing(established(rx.port)) as sock:
        sock.sendall(payload)
        assert expect_abort(sock) == reason
    line = outcome(lines, "association HOSTILE -> FIONA")
    assert "aborted: " in line and fragment in line, line
    wait_for(lambda: not rx.server._threads, PEER_TIMEOUT, "the worker to finish")
    assert [ln for ln in lines() if "association" in ln] == [line]


def test_new_command_before_the_data_set_is_complete_stores_nothing(receiver, lines):
    rx = receiver()
    first, second = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    data1 = dataset(first)
    with closing(established(rx.port)) as sock:
        sock.sendall(p_data(pdv(3, 3, c_store_rq(first, 1)), pdv(3, 0, data1[:40])))
        sock.sendall(p_data(pdv(3, 3, c_store_rq(second, 2)), pdv(3, 2, dataset(second))))
        assert expect_abort(sock) == 5
    line = outcome(lines, "association HOSTILE -> FIONA")
    assert "a new command arrived before the data set" in line and "0 stored" in line
    assert rx.stored() == [] and rx.journal() == ""
    assert not (rx.tree.quarantine / "receive").exists() or \
        not list((rx.tree.quarantine / "receive").iterdir())


def test_release_in_the_middle_of_a_message_stores_nothing(receiver, caplog):
    rx = receiver()
    sop = "1.2.826.0.1.3680043.8.498.5"
    with closing(established(rx.port)) as sock:
        sock.sendall(p_data(pdv(3, 3, c_store_rq(sop)), pdv(3, 0, dataset(sop)[:40])))
        sock.sendall(pdu(0x05, bytes(4)))
        assert read_pdu(sock)[0] == 0x06
    [record] = wait_for(lambda: [r for r in caplog.records if "association HOSTILE" in
                                 r.getMessage()], PEER_TIMEOUT, "the association line")
    assert record.levelno == logging.WARNING
    assert "released with a message incomplete" in record.getMessage()
    assert rx.stored() == [] and rx.journal() == ""


def test_oversized_command_set_is_aborted(receiver, lines):
    rx = receiver()
    with closing(established(rx.port)) as sock:
        chunk = bytes(16 << 10)
        try:
            for _ in range(MAX_COMMAND // len(chunk) + 2):
                sock.sendall(p_data(pdv(1, 1, chunk)))
        except OSError:
            pass  # the receiver may have closed already
        assert expect_abort(sock) == 6
    assert f"DIMSE command set exceeds {MAX_COMMAND} bytes" in outcome(lines, "aborted")


def test_responses_honour_the_peers_maximum_pdu_length(receiver):
    rx = receiver()
    rq = associate_rq(DEFAULT_ITEMS[:3] + (user_info(32),))
    with closing(established(rx.port, rq)) as sock:
        sock.sendall(p_data(pdv(1, 3, c_echo_rq(7))))
        response = b""
        while True:
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x04 and len(body) <= 32, (pdu_type, len(body))
            [(length, cid, control)] = [struct.unpack_from(">IBB", body)]
            assert length == len(body) - 4 and cid == 1 and control & 1
            response += body[6:]
            if control & 2:
                break
        fields = parse_command(response)
        assert fields[0x0100] == us(0x8030) and fields[0x0120] == us(7)
        assert fields[0x0900] == us(0)
        sock.sendall(pdu(0x05, bytes(4)))
        assert read_pdu(sock)[0] == 0x06


def test_a_well_formed_store_over_a_raw_peer_is_stored(receiver, lines):
    """The raw peer of these tests is itself right: the same exchange without a fault stores
    the object and answers success."""
    rx = receiver()
    sop = "1.2.826.0.1.3680043.8.498.3"
    data = dataset(sop)
    with closing(established(rx.port)) as sock:
        sock.sendall(p_data(pdv(3, 3, c_store_rq(sop, 4)), pdv(3, 0, data[:40])))
        sock.sendall(p_data(pdv(3, 2, data[40:])))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04
        assert parse_command(body[6:])[0x0900] == us(0)
        sock.sendall(pdu(0x05, bytes(4)))
        assert read_pdu(sock)[0] == 0x06
    [stored] = rx.stored()
    assert stored.read_bytes().endswith(data)
    assert "1 stored, 0 failed" in outcome(lines, "released")


# ------------------------------------------------------------------ 5: truncated sequences

def test_truncation_inside_a_defined_length_sequence_is_refused(receiver):
    rx = receiver()
    sop = "1.2.826.0.1.3680043.8.498.4"
    data = dataset(sop)
    # a defined-length sequence whose one item declares more bytes than the sequence holds
    seq = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 16) \
        + struct.pack("<HHI", 0xFFFE, 0xE000, 968) + bytes(8)
    at = data.find(struct.pack("<HH", 0x0020, 0x000D))  # before StudyInstanceUID
    status = raw_c_store(rx.port, data[:at] + seq + data[at:], MR, sop)
    assert status == 0xC000
    assert rx.stored() == []
    [reason] = [p.read_text() for p in (rx.tree.quarantine / "receive").glob("*/reason.json")]
    assert "968" in reason


# ------------------------------------------------------------------ 7: AE titles in the log

def test_printable_escapes_what_is_not_printable_ascii():
    assert printable(b"  STORESCU  ") == "STORESCU"
    assert printable(b"EVIL\x00\n\xff\\A") == "EVIL\\x00\\x0a\\xff\\x5cA"
    assert printable(b" " * 16) == ""


def test_hostile_ae_titles_reach_the_log_escaped(receiver, lines):
    rx = receiver()
    rq = associate_rq(calling=b"EVIL\x00\nFAKE\xff", called=b"\x1b[31mX")
    with closing(established(rx.port, rq)) as sock:
        sock.sendall(pdu(0x05, bytes(4)))
        assert read_pdu(sock)[0] == 0x06
    line = outcome(lines, "association EVIL")
    assert "EVIL\\x00\\x0aFAKE\\xff -> \\x1b[31mX" in line
    assert not any(c in ln for ln in lines() for c in "\x00\n\x1b\xff")


# ------------------------------------------------------------------ valid senders still work

@pytest.mark.parametrize("name", ["rtplan.dcm", "rtdose.dcm", "waveform_ecg.dcm", "MR_small.dcm",
                                  "JPEG2000.dcm"])
def test_pynetdicom_sender_is_stored_byte_for_byte(receiver, name):
    """Objects with nested sequences (defined and undefined length) and encapsulated pixel
    data pass the deeper walk and are filed exactly as sent."""
    path = Path(get_testdata_file(name))
    meta = pydicom.dcmread(path, stop_before_pixels=True)
    raw = path.read_bytes()
    data = raw[144 + int.from_bytes(raw[140:144], "little"):]
    rx = receiver()
    ts = str(meta.file_meta.TransferSyntaxUID)
    assert raw_c_store(rx.port, data, meta.SOPClassUID, meta.SOPInstanceUID, ts) == 0
    [stored] = rx.stored()
    assert dataset_part(stored) == (ts, data)

