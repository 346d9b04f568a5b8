"""A bounded wait at a DataLoader worker's exit for its queue feeder threads.

A spawned DataLoader worker told to stop early (the loop broke out mid-epoch) cancels the
join of its result queue's feeder thread and exits while that daemon thread may still be
pickling a batch inside torch's C++ `THPStorage_shareFd`. When the thread then asks for the
GIL during interpreter shutdown, CPython ends it with pthread_exit, whose forced unwind through
the C++ frame calls std::terminate: "terminate called without an active exception" and a
worker killed by SIGABRT (seen in a core dump). Letting the feeder finish first avoids it.
Forked workers leave through os._exit and never reach this point.
The main process terminates a worker that has not exited 5 s after shutdown: wait no longer.

Anything a spawned worker unpickles (`H5Dataset`, the training loader's datasets) calls
`join_queue_feeders_at_exit()` once.
"""

from __future__ import annotations

import atexit
import threading
import time

FEEDER_JOIN_SECONDS = 5.0
_exit_hook = False


def join_queue_feeders_at_exit() -> None:
    """Register (once) a bounded wait at exit for the queue feeder threads of a DataLoader worker."""
    global _exit_hook
    if not _exit_hook:
        _exit_hook = True
        atexit.register(join_queue_feeders)


def join_queue_feeders() -> None:
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:  # not a DataLoader worker: leave other queues alone
        return
    deadline = time.monotonic() + FEEDER_JOIN_SECONDS
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
