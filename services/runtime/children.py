"""Child processes that never outlive their parent.

`llmbus up` and the tests start services and nats-server in sessions of their own (so a terminal's
Ctrl-C reaches only the supervisor, which stops them in order). A session of its own also means
nothing stops them if the parent is SIGKILLed; Linux's parent-death signal does.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """`preexec_fn` of a child: SIGTERM when the thread that started it dies. It makes no Python
    allocation worth a lock (a resolved libc call), so it is safe with the parent's reader threads."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
