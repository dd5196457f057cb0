"""The process group and its collectives (torch.distributed's functions and semantics).

Transports, none of them ours:
  MPI (mpi4py)   CPU tensors and emulated-CUDA tensors (numpy arrays): buffer-based
                 collectives straight on the tensor's memory (no pickling), in place
  NCCL (CuPy)    CuPy tensors on a real GPU: cupy.cuda.nccl on a side stream, the unique id
                 broadcast over MPI (ChainerMN's pure_nccl design). NOT YET RUN ON A GPU.

Rank and world size come from the MPI launcher (``mpiexec -n N``); a script run without one
is a world of size 1. Backend names: "mpi"; "gloo" is accepted as the name of the CPU backend
(it runs on MPI) so PyTorch CPU scripts port unchanged; "nccl" also carries CuPy tensors
over NCCL (with "mpi"/"gloo", CuPy tensors are staged through host memory and MPI).
"""
import datetime
import os
import pickle

import numpy as np

from ..runtime.dtypes import is_floating
from . import _fault, _shm

DEFAULT_TIMEOUT_S = 600.0   # 10 minutes, as PyTorch's NCCL default


class ReduceOp:
    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"
    PRODUCT = "product"


class Backend:
    MPI = "mpi"
    GLOO = "gloo"
    NCCL = "nccl"


_pg = None   # the default process group (a _ProcessGroup) once initialised


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            "gpudiff.distributed needs mpi4py and an MPI library: pip install "
            "'gpudiff[distributed]' (mpi4py + the mpich wheel, which brings mpiexec)") from e
    return MPI


def is_available():
    """True when mpi4py can be imported (without initialising MPI)."""
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None


def is_mpi_available():
    return is_available()


def is_gloo_available():   # "gloo" is our MPI CPU backend
    return is_available()


def is_nccl_available():
    try:
        from cupy.cuda import nccl  # noqa: F401
        return True
    except Exception:   # noqa: BLE001  (no cupy, no NCCL library)
        return False


def is_initialized():
    return _pg is not None


def _get_pg():
    if _pg is None:
        raise ValueError("Default process group has not been initialized, please make sure "
                         "to call init_process_group.")
    return _pg


def get_rank(group=None):
    return _get_pg().rank if _pg is not None else -1


def get_world_size(group=None):
    return _get_pg().size if _pg is not None else -1


def get_backend(group=None):
    return _get_pg().backend


def _timeout_seconds(timeout):
    if timeout is None:
        env = os.environ.get("GPUDIFF_DIST_TIMEOUT")
        return float(env) if env else DEFAULT_TIMEOUT_S
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


class _ProcessGroup:
    def __init__(self, backend, timeout_s):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()      # our own communicator: user MPI code is safe
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        # all_reduce of host arrays through a shared-memory window when every rank is on
        # this node (_shm.py); GPUDIFF_DIST_SHM=0 turns it off, GPUDIFF_DIST_SHM_MIN sets
        # the smallest message (bytes) that takes it. Collective: every rank reads the same
        # environment from the launcher.
        self.shm = None
        if os.environ.get("GPUDIFF_DIST_SHM", "1") != "0":
            self.shm = _shm.ShmAllreduce.for_comm(MPI, self.comm)
        env_min = os.environ.get("GPUDIFF_DIST_SHM_MIN")
        self.shm_min_bytes = int(env_min) if env_min else _shm.MIN_BYTES
        self.backend = backend
        self.timeout_s = timeout_s
        self.seq = 0
        self._nccl = None
        self._ops = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVG: MPI.SUM, ReduceOp.MAX: MPI.MAX,
                     ReduceOp.MIN: MPI.MIN, ReduceOp.PRODUCT: MPI.PROD}

    def next_seq(self):
        self.seq += 1
        return self.seq

    def mpi_op(self, op):
        try:
            return self._ops[op]
        except KeyError:
            raise ValueError(f"unknown reduce op {op!r} (use ReduceOp.SUM, AVG, MAX, MIN or "
                             f"PRODUCT)") from None

    def nccl(self, device_index):
        if self._nccl is None:
            from ._nccl import NcclComm
            self._nccl = NcclComm(self.comm, self.rank, self.size, device_index)
        return self._nccl


def init_process_group(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1,
                       store=None, group_name="", pg_options=None, device_id=None):
    """Join the job started by ``mpiexec -n N`` (or ``gpudiff train --nproc N``).

    backend: None or "mpi" or "gloo" (CPU backend on MPI), "nccl" (CuPy tensors over NCCL;
    CPU tensors still over MPI). world_size and rank, when given, must agree with the
    launcher's. timeout: a timedelta or seconds (default GPUDIFF_DIST_TIMEOUT, else 10 min):
    a collective waiting longer ends the whole job, naming the collective.
    """
    global _pg
    if _pg is not None:
        raise RuntimeError("trying to initialize the default process group twice!")
    backend = (backend or Backend.MPI).lower()
    for part in backend.split(","):   # "cpu:gloo,cuda:nccl" as PyTorch writes it
        name = part.split(":")[-1]
        if name not in (Backend.MPI, Backend.GLOO, Backend.NCCL):
            raise ValueError(f"init_process_group: unknown backend {backend!r} (choose from "
                             f"'mpi', 'gloo' (our CPU backend, on MPI) and 'nccl')")
    if init_method not in (None, "env://") and not str(init_method).startswith("mpi"):
        raise ValueError(f"init_process_group: init_method {init_method!r}: ranks come from "
                         f"the MPI launcher here (leave init_method out)")
    pg = _ProcessGroup(Backend.NCCL if "nccl" in backend else
                       (Backend.GLOO if "gloo" in backend else Backend.MPI),
                       _timeout_seconds(timeout))
    if world_size not in (-1, None) and int(world_size) != pg.size:
        raise ValueError(f"init_process_group: world_size={world_size} but the launcher "
                         f"started {pg.size} rank(s) (mpiexec -n {world_size} ...)")
    if rank not in (-1, None) and int(rank) != pg.rank:
        raise ValueError(f"init_process_group: rank={rank} but the launcher made this "
                         f"process rank {pg.rank}")
    for key, value in (("RANK", pg.rank), ("WORLD_SIZE", pg.size),
                       ("LOCAL_RANK", pg.local_rank), ("LOCAL_WORLD_SIZE", pg.local_size)):
        os.environ.setdefault(key, str(value))
    _pg = pg
    _fault.install(pg.comm, pg.rank, pg.timeout_s)
    if pg.backend == Backend.NCCL and device_id is not None:
        idx = device_id if isinstance(device_id, int) else (device_id.index or 0)
        pg.nccl(idx)


def destroy_process_group(group=None):
    """Leave the process group (MPI itself stays initialised until the process exits)."""
    global _pg
    if _pg is None:
        return
    pg, _pg = _pg, None
    if pg._nccl is not None:
        pg._nccl.close()
    if pg.shm is not None:
        pg.shm.close()
    _fault.uninstall()
    pg.comm.Free()


# ---- work handles -------------------------------------------------------------------------
class Work:
    """What ``async_op=True`` returns: ``wait()`` blocks until the collective is done (and
    its result is in the tensors); ``is_completed()`` asks without blocking."""

    def __init__(self, name, seq, request=None, finish=None, event=None):
        self._name, self._seq = name, seq
        self._request = request     # an MPI request (None once complete)
        self._finish = finish       # copies results into place once complete
        self._event = event         # NCCL: a CUDA event recorded on the side stream
        self._done = request is None and event is None
        if event is not None:       # the watchdog polls it (a stuck NCCL call ends the job)
            _fault.track(name, seq, event)
        if self._done and finish is not None:
            finish()

    def _complete(self):
        self._request = None
        self._done = True
        if self._finish is not None:
            f, self._finish = self._finish, None
            f()

    def wait(self, timeout=None):
        if self._done:
            return True
        if self._event is not None:   # NCCL: the current stream waits, the host does not
            import cupy
            cupy.cuda.get_current_stream().wait_event(self._event)
            self._event = None
            self._complete()
            return True
        with _fault.waiting(self._name, self._seq):
            self._request.Wait()
        self._complete()
        return True

    def test(self):
        """One step of MPI progress; True when complete (no blocking)."""
        if self._done:
            return True
        if self._event is not None:
            return bool(self._event.done)
        if self._request.Test():
            self._complete()
        return self._done

    is_completed = test

    def result(self):
        self.wait()
        return []


def _ret(work, async_op):
    if async_op:
        return work
    work.wait()
    return None


# ---- helpers on arrays ---------------------------------------------------------------------
def _array(t):
    a = getattr(t, "array", None)
    if a is None:
        raise TypeError(f"expected a gpudiff Tensor, got {type(t).__name__}")
    return a


def _is_host(a):
    return isinstance(a, np.ndarray)


def _contig(a):
    """(buffer for MPI, copy-back or None): MPI needs contiguous memory."""
    if a.flags.c_contiguous:
        return a, None
    buf = np.ascontiguousarray(a)
    return buf, (lambda: np.copyto(a, buf))


def _bump(t):
    v = getattr(t, "_version", None)   # an in-place change: saved copies of it now raise
    if v is not None:
        v[0] += 1


def _chain(*fns):
    fns = [f for f in fns if f is not None]
    return (lambda: [f() for f in fns]) if fns else None


def _avg_fix(buf, op, size):
    if op != ReduceOp.AVG:
        return None
    if is_floating(buf.dtype):
        return lambda: np.divide(buf, size, out=buf)
    return lambda: np.floor_divide(buf, size, out=buf)


class _Staged:
    """A CuPy tensor on a process group without NCCL: copy to host, MPI, copy back."""

    def __init__(self, a):
        import cupy
        self.dev, self.host = a, cupy.asnumpy(a)

    def back(self):
        import cupy
        self.dev[...] = cupy.asarray(self.host)


def _use_nccl(pg, a):
    return pg.backend == Backend.NCCL and not _is_host(a)


# ---- collectives ---------------------------------------------------------------------------
def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
    """Reduce ``tensor`` over all ranks, in place (SUM, AVG, MAX, MIN, PRODUCT)."""
    pg = _get_pg()
    seq = pg.next_seq()
    a = _array(tensor)
    _bump(tensor)
    if _use_nccl(pg, a):
        ev = pg.nccl(a.device.id).all_reduce(a, op)
        return _ret(Work("all_reduce", seq, event=ev), async_op)
    staged = None
    if not _is_host(a):
        staged = _Staged(a)
        a = staged.host
    buf, back = _contig(a)
    mop = pg.mpi_op(op)
    if pg.size == 1:
        req = None
    elif pg.shm is not None and _shm.usable(buf, op, pg.shm_min_bytes):
        # synchronous, also for async_op=True: the handle comes back already complete
        with _fault.waiting("all_reduce", seq):
            pg.shm.allreduce(buf, op)
        finish = _chain(back, staged.back if staged else None)   # AVG already divided
        return _ret(Work("all_reduce", seq, None, finish), async_op)
    elif async_op:
        req = pg.comm.Iallreduce(pg.MPI.IN_PLACE, buf, mop)
    else:
        with _fault.waiting("all_reduce", seq):
            pg.comm.Allreduce(pg.MPI.IN_PLACE, buf, mop)
        req = None
    finish = _chain(_avg_fix(buf, op, pg.size), back, staged.back if staged else None)
    return _ret(Work("all_reduce", seq, req, finish), async_op)


def broadcast(tensor, src=0, group=None, async_op=False):
    """Copy rank ``src``'s ``tensor`` into ``tensor`` on every rank."""
    pg = _get_pg()
    seq = pg.next_seq()
    a = _array(tensor)
    if pg.rank != src:
        _bump(tensor)
    if not 0 <= src < pg.size:
        raise ValueError(f"broadcast: src={src} is not a rank (world size {pg.size})")
    if _use_nccl(pg, a):
        ev = pg.nccl(a.device.id).broadcast(a, src)
        return _ret(Work("broadcast", seq, event=ev), async_op)
    staged = None
    if not _is_host(a):
        staged = _Staged(a)
        a = staged.host
    buf, back = _contig(a)
    if pg.size == 1:
        req = None
    elif async_op:
        req = pg.comm.Ibcast(buf, root=src)
    else:
        with _fault.waiting("broadcast", seq):
            pg.comm.Bcast(buf, root=src)
        req = None
    return _ret(Work("broadcast", seq, req, _chain(back, staged.back if staged else None)),
                async_op)


def _check_list(name, tensors, pg, like):
    if len(tensors) != pg.size:
        raise ValueError(f"{name}: expected a list of {pg.size} tensors (the world size), got "
                         f"{len(tensors)}")
    for i, t in enumerate(tensors):
        if tuple(t.shape) != tuple(like.shape) or t.dtype != like.dtype:
            raise ValueError(f"{name}: tensor {i} has shape {tuple(t.shape)} {t.dtype}, "
                             f"expected {tuple(like.shape)} {like.dtype}")


def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    """``output_tensor`` (world_size * n elements) <- every rank's ``input_tensor``
    (n elements), in rank order."""
    pg = _get_pg()
    seq = pg.next_seq()
    out, inp = _array(output_tensor), _array(input_tensor)
    if out.size != inp.size * pg.size or out.dtype != inp.dtype:
        raise ValueError(f"all_gather_into_tensor: output has {out.size} {out.dtype} "
                         f"elements, expected {inp.size * pg.size} {inp.dtype}")
    _bump(output_tensor)
    if _use_nccl(pg, out):
        ev = pg.nccl(out.device.id).all_gather(inp, out)
        return _ret(Work("all_gather", seq, event=ev), async_op)
    staged = None
    if not _is_host(out):
        staged = _Staged(out)
        out, inp = staged.host, __import__("cupy").asnumpy(inp)
    obuf, back = _contig(out)
    ibuf = np.ascontiguousarray(inp)
    if pg.size == 1:
        np.copyto(obuf.reshape(-1), ibuf.reshape(-1))
        req = None
    elif async_op:
        req = pg.comm.Iallgather(ibuf, obuf)
    else:
        with _fault.waiting("all_gather", seq):
            pg.comm.Allgather(ibuf, obuf)
        req = None
    return _ret(Work("all_gather", seq, req, _chain(back, staged.back if staged else None)),
                async_op)


def all_gather(tensor_list, tensor, group=None, async_op=False):
    """``tensor_list[r]`` <- rank r's ``tensor``, for every r."""
    pg = _get_pg()
    _check_list("all_gather", tensor_list, pg, tensor)
    from ..creation import empty
    flat = empty((pg.size,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
    work = all_gather_into_tensor(flat, tensor, async_op=True)
    fa = flat.array

    def scatter():
        for r, t in enumerate(tensor_list):
            _bump(t)
            t.array[...] = fa[r]
    work._finish = _chain(work._finish, scatter) if not work._done else None
    if work._done:
        scatter()
    return _ret(work, async_op)


def reduce_scatter_tensor(output, input, op=ReduceOp.SUM, group=None, async_op=False):
    """``output`` (n elements) <- block ``rank`` of ``input`` (world_size * n elements)
    reduced over all ranks."""
    pg = _get_pg()
    seq = pg.next_seq()
    out, inp = _array(output), _array(input)
    if inp.size != out.size * pg.size or out.dtype != inp.dtype:
        raise ValueError(f"reduce_scatter_tensor: input has {inp.size} {inp.dtype} elements, "
                         f"expected {out.size * pg.size} {out.dtype}")
    _bump(output)
    if _use_nccl(pg, out):
        ev = pg.nccl(out.device.id).reduce_scatter(inp, out, op)
        return _ret(Work("reduce_scatter", seq, event=ev), async_op)
    staged = None
    if not _is_host(out):
        staged = _Staged(out)
        out, inp = staged.host, __import__("cupy").asnumpy(inp)
    obuf, back = _contig(out)
    ibuf = np.ascontiguousarray(inp)
    mop = pg.mpi_op(op)
    if pg.size == 1:
        np.copyto(obuf.reshape(-1), ibuf.reshape(-1))
        req = None
    elif async_op:
        req = pg.comm.Ireduce_scatter_block(ibuf, obuf, mop)
    else:
        with _fault.waiting("reduce_scatter", seq):
            pg.comm.Reduce_scatter_block(ibuf, obuf, mop)
        req = None
    finish = _chain(_avg_fix(obuf, op, pg.size), back, staged.back if staged else None)
    return _ret(Work("reduce_scatter", seq, req, finish), async_op)


def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False):
    """``output`` <- ``input_list[rank]`` reduced over all ranks."""
    pg = _get_pg()
    _check_list("reduce_scatter", input_list, pg, output)
    from ..functions import stack
    flat = stack([t.detach() for t in input_list])
    return reduce_scatter_tensor(output, flat, op=op, async_op=async_op)


def barrier(group=None, async_op=False, device_ids=None):
    """Wait until every rank has called barrier."""
    pg = _get_pg()
    seq = pg.next_seq()
    if pg.size == 1:
        return _ret(Work("barrier", seq), async_op)
    if async_op:
        return Work("barrier", seq, pg.comm.Ibarrier())
    with _fault.waiting("barrier", seq):
        pg.comm.Barrier()
    return None


# ---- Python objects (pickled: setup and checks only, never the training hot path) ----------
def broadcast_object_list(object_list, src=0, group=None, device=None):
    pg = _get_pg()
    seq = pg.next_seq()
    with _fault.waiting("broadcast_object_list", seq):
        data = pg.comm.bcast(pickle.dumps(list(object_list)) if pg.rank == src else None,
                             root=src)
    object_list[:] = pickle.loads(data)


def all_gather_object(object_list, obj, group=None):
    pg = _get_pg()
    seq = pg.next_seq()
    if len(object_list) != pg.size:
        raise ValueError(f"all_gather_object: expected a list of {pg.size} slots, got "
                         f"{len(object_list)}")
    with _fault.waiting("all_gather_object", seq):
        got = pg.comm.allgather(obj)
    object_list[:] = got


def new_comm():
    """A duplicate of the group's communicator (DDP's buckets run on their own, so their
    non-blocking all-reduces never interleave with the user's collectives)."""
    return _get_pg().comm.Dup()
