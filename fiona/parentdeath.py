"""Dying with one's parent: the kernel's parent-death signal (Linux prctl PR_SET_PDEATHSIG).

Kept free of heavy imports, so that a child process can ask for it first thing after it
starts: until then a child whose parent was killed lives on as an orphan."""

from __future__ import annotations

import ctypes
import os

_PR_SET_PDEATHSIG = 1


def die_with(parent: int, sig: int, what: str) -> str | None:
    """Have the kernel send us `sig` when our parent dies; None, or the text of why that
    could not be arranged (`parent`, our `what`, is no longer our parent: it died already)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}"
    if os.getppid() != parent:
        return f"the {what} (pid {parent}) that started this process is gone"
    return None
