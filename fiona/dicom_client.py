"""The client (SCU) side of FIONA's DICOM associations through pynetdicom, one definition for
every client: the `dicom` destination's queries and echo and the Review page's PACS
(`fiona.send.destinations.dicom`, `fiona.review.pacs`), `fiona inventory`, `fiona
pull-from-scanner` and `fiona retrieve`. (The destination's C-STOREs go through FIONA's own
requestor, `fiona.send.storescu`.)

Every association asks for no Nagle on its socket (requests are small and answered one by one),
keeps identifiers out of pynetdicom's debug log, pauses the reactor before each request
(`quiesce`, pynetdicom issues #842 and #875) and is released, or aborted when that fails.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

log = logging.getLogger("fiona.dicom")


class Timeouts(NamedTuple):
    """pynetdicom's four timeouts of an association, in seconds."""

    connection: float
    acse: float
    dimse: float
    network: float


def associate(calling: str, host: str, port: int, aetitle: str, contexts: list,
              timeouts: Timeouts, ext_neg: list | None = None, handlers: list | None = None):
    """An association request from `calling` to `aetitle@host:port`: the association, whether
    established or not (`refusal` says why not). `ext_neg` (e.g. SCP/SCU role selection for
    C-GET) and extra event `handlers` go to the request."""
    from pynetdicom import AE, _config, evt

    # pynetdicom's debug log (`-v`) would print every query and answer, PatientIDs with them
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
    # a file path given to send_c_store goes out as it is on disk, streamed after its file
    # meta, instead of being decoded and encoded again (the dicom destination's fast path)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(calling)
    ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = timeouts
    assoc = ae.associate(host, port, contexts=contexts, ae_title=aetitle, ext_neg=ext_neg,
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay), *(handlers or [])])
    if assoc.is_established and not isinstance(assoc._reactor_checkpoint, Checkpoint):
        assoc._reactor_checkpoint = Checkpoint()
    return assoc


def refusal(assoc) -> str:
    """Why `assoc` was not established, as the end of a sentence about the peer."""
    rsp = assoc.acceptor.primitive if assoc.is_rejected else None
    if rsp is None:
        return "cannot be reached"
    return f"rejected the association ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"


@contextmanager
def open_session(calling: str, host: str, port: int, aetitle: str, models: list, what: str,
            timeouts: Timeouts, fail: Callable[[str], Exception]) -> Iterator[Any]:
    """One established association offering the SOP classes `models` (default transfer
    syntaxes; `what` names them in messages), released (or aborted) at the end. When the peer
    cannot be reached, refuses, or does not accept every model, raises `fail(<why, as the end
    of a sentence about the peer>)`."""
    from pynetdicom import build_context

    try:
        assoc = associate(calling, host, port, aetitle, [build_context(m) for m in models],
                          timeouts)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot be reached: {exc}") from None
    if not assoc.is_established:
        raise fail(refusal(assoc))
    accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    if {str(m) for m in models} - accepted:
        release(assoc)
        raise fail(f"does not accept {what}")
    try:
        yield assoc
    finally:
        release(assoc)


class Checkpoint(threading.Event):
    """Stands in for pynetdicom's `Association._reactor_checkpoint` and knows when the
    association's reactor thread is really blocked on it.

    pynetdicom 3.0 pauses its reactor before each request by clearing the checkpoint and
    waiting for `_is_paused`, but the reactor sets `_is_paused = True` on every loop pass,
    also when the checkpoint is set: if a request starts in that window, the reactor wakes,
    takes the peer's response off the DIMSE queue ("Received unexpected C-STORE service
    message") and the request waits for the DIMSE timeout (pynetdicom issues #842, #875;
    seen here in about one send in three with 4 associations). `quiesce` waits until the
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


def quiesce(assoc, timeout: float = 5.0) -> bool:
    """Pause `assoc`'s reactor for the next request; False if the reactor is gone."""
    checkpoint = assoc._reactor_checkpoint
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = assoc._reactor_checkpoint = Checkpoint()
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while not checkpoint.blocked:
        if not assoc.is_established or time.monotonic() > deadline:
            checkpoint.set()
            return False
        time.sleep(0.0001)
    return True


def release(assoc) -> None:
    """Release an association (abort it if it is broken or the peer does not answer)."""
    if assoc.is_established and quiesce(assoc):
        assoc.release()
    if not assoc.is_released:
        assoc.abort()


def nodelay(event) -> None:
    """EVT_CONN_OPEN: no Nagle on the association's socket (pynetdicom has no option)."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # e.g. a TLS wrapper without the option
        log.debug("cannot set TCP_NODELAY: %s", exc)


def status_text(code: int, status) -> str:
    """A DIMSE status for a message: its code, meaning and the peer's ErrorComment."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    text = f"status 0x{code:04X}"
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (None, ""))[1]
    comment = str(status.get("ErrorComment", "") or "").strip()
    detail = ", ".join(x for x in (meaning, comment) if x)
    return f"{text} ({detail})" if detail else text


def answers(responses, what: str, fail: Callable[[str], Exception]) -> tuple[list, int, Any]:
    """The identifiers of the pending responses to a C-FIND/C-MOVE/C-GET (`what`), with the
    final status code and dataset. A response without a status (the peer aborted or the DIMSE
    timeout passed) or no final status raises `fail(<why, as the end of a sentence about the
    peer>)`; what a final status means is the caller's."""
    found = []
    for status, ident in responses:
        if "Status" not in status:
            raise fail(f"did not answer a {what} (aborted or timed out)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            if ident is not None:
                found.append(ident)
            continue
        return found, code, status
    raise fail(f"ended a {what} without a final status")
