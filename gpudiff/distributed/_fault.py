"""Fault handling for multi-rank jobs, all in one place.

1. An uncaught exception on any rank (main thread or another thread) prints that rank's
   traceback, prefixed with its rank, and calls ``MPI_Abort``: the launcher then ends every
   rank of the job within seconds. Without it, Python's exit would run mpi4py's
   ``MPI_Finalize``, which waits for the other ranks, and they wait in their next
   collective: a hang.
2. A watchdog thread ends the job when one collective waits longer than the process
   group's timeout, naming the collective, its sequence number and the rank. Collectives
   register themselves (``begin``) while they wait; mpi4py releases the GIL inside MPI's
   blocking calls, so the watchdog runs while a rank is stuck in one. NCCL collectives never
   block the host (the caller's stream waits for their event), so they register their
   CUDA event instead (``track``) and the watchdog polls it until it completes, as
   PyTorch's NCCL watchdog does: a GPU collective stuck past the timeout ends the job too.
"""
import contextlib
import os
import sys
import threading
import time
import traceback

_state = {"comm": None, "rank": 0, "timeout": None, "installed": False}
_waiting = {}            # token -> (name, seq, started)
_events = {}             # token -> (name, seq, started, event): NCCL work not yet complete
_lock = threading.Lock()
_tokens = iter(range(1 << 62))
_watchdog = None
_stop = threading.Event()


def abort(message, code=1):
    """Print ``message`` to stderr and end the whole job (every rank) with ``code``."""
    with contextlib.suppress(Exception):   # a closed stream must not stop the abort
        sys.stderr.write(message if message.endswith("\n") else message + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
    comm = _state["comm"]
    if comm is not None and comm.Get_size() > 1:
        comm.Abort(code)
    os._exit(code)


def _report(exc_type, exc, tb, where=""):
    rank = _state["rank"]
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    lines = "".join(f"[rank {rank}] {line}\n" for line in text.rstrip("\n").split("\n"))
    abort(f"[rank {rank}] gpudiff.distributed: uncaught {exc_type.__name__}{where}; ending "
          f"the job on all ranks (MPI_Abort)\n{lines}")


def _excepthook(exc_type, exc, tb):
    if issubclass(exc_type, SystemExit):   # sys.exit(n) is handled by the interpreter
        return sys.__excepthook__(exc_type, exc, tb)
    _report(exc_type, exc, tb)


def _thread_excepthook(args):
    if args.exc_type is SystemExit:
        return
    _report(args.exc_type, args.exc_value, args.exc_traceback,
            f" in thread {getattr(args.thread, 'name', '?')}")


def install(comm, rank, timeout):
    """Called by init_process_group: the excepthooks and the watchdog for this process."""
    global _watchdog
    _state.update(comm=comm, rank=rank, timeout=timeout)
    if comm.Get_size() <= 1 or _state["installed"]:
        return
    _state["installed"] = True
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    _stop.clear()
    _watchdog = threading.Thread(target=_watch, name="gpudiff-dist-watchdog", daemon=True)
    _watchdog.start()


def uninstall():
    global _watchdog
    if _state["installed"]:
        sys.excepthook = sys.__excepthook__
        threading.excepthook = threading.__excepthook__
        _stop.set()
        _state["installed"] = False
    _watchdog = None
    _state["comm"] = None


def set_timeout(seconds):
    _state["timeout"] = seconds


def begin(name, seq):
    """Mark a collective as waiting; returns the token for ``end``."""
    tok = next(_tokens)
    with _lock:
        _waiting[tok] = (name, seq, time.monotonic())
    return tok


def end(tok):
    with _lock:
        _waiting.pop(tok, None)


@contextlib.contextmanager
def waiting(name, seq):
    """``with waiting("all_reduce", seq): ...``: begin / end around a blocking collective."""
    tok = begin(name, seq)
    try:
        yield
    finally:
        end(tok)


def track(name, seq, event):
    """An NCCL collective's completion event (anything with ``.done``), polled by the
    watchdog until it is done."""
    with _lock:
        _events[next(_tokens)] = (name, seq, time.monotonic(), event)


def overdue(now=None):
    """The message for the first collective waiting longer than the timeout, or None; NCCL
    events found complete are forgotten."""
    timeout = _state["timeout"]
    if not timeout:
        return None
    now = time.monotonic() if now is None else now
    with _lock:
        late = [(name, seq, now - t0, "") for name, seq, t0 in _waiting.values()
                if now - t0 > timeout]
        for tok, (name, seq, t0, ev) in list(_events.items()):
            if bool(ev.done):
                del _events[tok]
            elif now - t0 > timeout:
                late.append((name, seq, now - t0, " on the GPU (NCCL)"))
    if not late:
        return None
    name, seq, waited, where = late[0]
    return (f"[rank {_state['rank']}] gpudiff.distributed: collective {name} (#{seq} on this "
            f"rank){where} waited {waited:.1f}s, longer than the timeout of {timeout:g}s "
            f"(init_process_group(timeout=...) or GPUDIFF_DIST_TIMEOUT); another rank is "
            f"stuck, gone, or calling different collectives. Ending the job.")


def _watch():
    while not _stop.wait(0.5):
        message = overdue()
        if message is not None:
            abort(message)
