"""All-reduce of host arrays between the ranks of one node through an MPI-3 shared-memory
window (``MPI.Win.Allocate_shared``): numpy does the copies and the additions, MPI only the
barriers.

Each rank owns one segment of the window: two chunk-sized *slots* (a copy of its input, for
the others to read) and two *result* areas (its 1/N slice of a chunk, reduced). A message is
cut into chunks (a few hundred KiB, so that what one phase writes is still in cache when the
next phase reads it); chunk k goes through three phases, pipelined so that one barrier
separates consecutive steps:

    step k:  publish chunk k      copy my input's slices i != rank into my slot[k % 2]
             reduce  chunk k-1    result[(k-1) % 2] = op(x_0, x_1, ..., x_{N-1}) over my slice,
                                  x_i = rank i's slot (my own input for i = rank), always in
                                  rank order: every element is reduced by one rank, in one
                                  fixed order, so all ranks get bitwise identical results and
                                  runs are reproducible
             gather  chunk k-2    copy every rank's result[(k-2) % 2] into my output
             Sync; Barrier; Sync  (MPI's memory model for shared windows: the window is
                                  locked with Lock_all once; Win.Sync orders the stores)

A slot written at step k is read by the others at step k+1 and rewritten at k+2, a result
written at k+1 is read at k+2 and rewritten at k+3: a barrier separates each pair, so two of
each suffice. A rank copies (N-1)/N of its input in, reduces 1/N, and copies all of the
result out: per rank about 2 + 1/N times the bytes of a memcpy of the message, against
ring all-reduce's 2 (N-1)/N transfers plus MPI's own bounce-buffer copies.

The window is allocated on the first call (collectively: every rank all-reduces the same
size) and grown when a larger message comes, up to ``chunk`` bytes per slot.

**Buffers that live in shared memory** (``alloc`` / ``allreduce_shared``: DDP's gradient
buckets, when their size takes this path). Each rank's buffer is its own segment of a window
of its own, which every rank can address, so nothing is copied in or out: after one barrier,
rank r reduces its 1/N slice, reading every rank's buffer in place (in rank order, a 64 KiB
piece at a time so the result is still in cache) and writes the result into every rank's
buffer; a second barrier ends it. Per rank that reads about (N+1)/N and writes about 1 times
the message, against a memcpy's read 1 + write 1, and no rank's input is ever staged:
docs/DISTRIBUTED.md has the numbers (80% of memcpy for a 25 MiB bucket, 2 ranks, vs 40% when
the input must be copied in and out). Such windows stay mapped until the process ends (the
bucket's gradients are views of them; freeing is collective and a view would dangle).
"""
import numpy as np

CHUNK_BYTES = 2 << 20          # bytes per chunk (per slot); see docs/DISTRIBUTED.md
MIN_BYTES = 1 << 20            # below this MPI's Allreduce (latency-bound) is as fast
_ALIGN = 64                    # bytes: slice boundaries on cache lines
_PIECE_BYTES = 64 << 10        # shared buffers: reduced a piece at a time (stays in L2)

_UFUNCS = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum,
           "product": np.multiply}


def usable(a, op, min_bytes=None):
    """Can this array and op go through the shared window (given a node-local group)?"""
    return (op in _UFUNCS and a.dtype.kind in "fiu" and a.dtype.isnative
            and a.nbytes >= (MIN_BYTES if min_bytes is None else min_bytes))


class ShmAllreduce:
    """One per communicator whose ranks are all on one node."""

    def __init__(self, MPI, comm, chunk_bytes=CHUNK_BYTES):
        self.MPI = MPI
        self.comm = comm                     # a communicator of its own (Split_type dup)
        # the non-blocking shared-buffer all-reduce's two barriers (arrived, reduced), each
        # kind on its own communicator so that each is posted in one order on every rank
        self.comm_arrive, self.comm_done = comm.Dup(), comm.Dup()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.chunk_bytes = int(chunk_bytes)
        self.win = None
        self.cap = 0                         # bytes per slot of the current window
        self.segs = None

    @staticmethod
    def for_comm(MPI, comm):
        """A ShmAllreduce when every rank of ``comm`` shares this node's memory, else None
        (collective over ``comm``)."""
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        if node.Get_size() != comm.Get_size() or comm.Get_size() < 2:
            node.Free()
            return None
        return ShmAllreduce(MPI, node)

    def _layout(self, cap):
        res = -(-(-(-cap // self.size)) // _ALIGN) * _ALIGN   # ceil(cap/N) to _ALIGN
        return cap, res, 2 * cap + 2 * res                     # slot, result, segment

    def _ensure(self, nbytes):
        need = min(max(nbytes, 1), self.chunk_bytes)
        need = -(-need // _ALIGN) * _ALIGN
        if need <= self.cap:
            return
        self.free_window()
        slot, res, seg = self._layout(need)
        MPI = self.MPI
        win = MPI.Win.Allocate_shared(seg, 1, comm=self.comm)
        win.Lock_all(MPI.MODE_NOCHECK)
        segs = []
        for i in range(self.size):
            buf, _ = win.Shared_query(i)
            mem = np.frombuffer(buf, np.uint8, count=seg)
            segs.append((mem[0:slot], mem[slot:2 * slot], mem[2 * slot:2 * slot + res],
                         mem[2 * slot + res:2 * slot + 2 * res]))
        self.win, self.cap, self.segs = win, need, segs

    def free_window(self):
        if self.win is not None:
            self.segs = None
            self.win.Unlock_all()
            self.win.Free()
            self.win, self.cap = None, 0

    def close(self):
        self.free_window()
        self.comm_arrive.Free()
        self.comm_done.Free()
        self.comm.Free()

    # ---- buffers in shared memory ------------------------------------------------------
    def alloc(self, count, dtype):
        """A zeroed 1-D array of ``count`` ``dtype`` elements in a shared window of its own
        (collective: every rank allocates the same count and dtype, in the same order).
        ``allreduce_shared`` reduces it in place with no staging copies."""
        dt = np.dtype(dtype)
        nbytes = -(-max(int(count) * dt.itemsize, 1) // _ALIGN) * _ALIGN
        win = self.MPI.Win.Allocate_shared(nbytes, 1, comm=self.comm)
        win.Lock_all(self.MPI.MODE_NOCHECK)
        arrays = [np.frombuffer(win.Shared_query(i)[0], np.uint8, count=nbytes)
                  [:int(count) * dt.itemsize].view(dt) for i in range(self.size)]
        arrays[self.rank].fill(0)
        if not hasattr(self, "_shared"):
            self._shared, self._wins = {}, []
        self._wins.append(win)                 # kept mapped: see the module doc
        mine = arrays[self.rank]
        self._shared[mine.__array_interface__["data"][0]] = (win, arrays)
        return mine

    def is_shared(self, x):
        """Is ``x`` an array from ``alloc`` (the whole of it)?"""
        reg = getattr(self, "_shared", {}).get(x.__array_interface__["data"][0])
        return reg is not None and reg[1][self.rank].size == x.size \
            and reg[1][self.rank].dtype == x.dtype

    def allreduce_shared(self, x, op, scale=None):
        """All-reduce an ``alloc`` array in place, reading the other ranks' arrays where they
        are. AVG divides by the world size; ``scale`` (floats) multiplies the result (DDP's
        1/N, so the result equals the staged path's sum-then-scale bitwise)."""
        win = self._shared[x.__array_interface__["data"][0]][0]
        self.win_sync(win)
        self._reduce_slice(x, op, scale)
        self.win_sync(win)
        return x

    def allreduce_shared_async(self, x, op, scale=None, after=None):
        """The same, non-blocking (DDP's buckets: the backward goes on meanwhile): returns a
        ``SharedWork``. ``after``: the previous one still pending, if any (they complete in
        order)."""
        return SharedWork(self, x, op, scale, after)

    def _reduce_slice(self, x, op, scale):
        """My 1/N slice of ``x``'s all-reduce, written into every rank's buffer (every rank
        has finished writing its buffer: the caller's barrier)."""
        win, xs = self._shared[x.__array_interface__["data"][0]]
        N, r, dt = self.size, self.rank, x.dtype
        n, item = x.size, dt.itemsize
        align = max(_ALIGN // item, 1)
        q = -(-(-(-n // N)) // align) * align              # ceil(n/N), aligned
        a, b = min(r * q, n), min((r + 1) * q, n)
        uf = _UFUNCS[op]
        if op == "avg":
            scale = None
        step = max(_PIECE_BYTES // item, 1)
        tmp = np.empty(min(step, max(b - a, 1)), dt) if N > 2 else None
        for o in range(a, b, step):
            e = min(o + step, b)
            # out: my own buffer when N == 2 (both inputs are read before it is written,
            # element by element); a scratch piece otherwise (rank r's input is still to come)
            out = xs[r][o:e] if N == 2 else tmp[:e - o]
            uf(xs[0][o:e], xs[1][o:e], out=out)
            for i in range(2, N):
                uf(out, xs[i][o:e], out=out)
            if op == "avg":
                if dt.kind == "f":
                    np.divide(out, N, out=out)
                else:
                    np.floor_divide(out, N, out=out)
            elif scale is not None:
                np.multiply(out, scale, out=out)
            for i in range(N):
                if N > 2 or i != r:
                    np.copyto(xs[i][o:e], out)

    def win_sync(self, win):
        win.Sync()
        self.comm.Barrier()
        win.Sync()

    def _sync(self):
        self.win.Sync()
        self.comm.Barrier()
        self.win.Sync()

    def allreduce(self, x, op):
        """In place on ``x`` (a C-contiguous numpy array, same shape and dtype on every
        rank). AVG divides the sum by the world size (floor division for integers), as the
        MPI path does."""
        flat = x.reshape(-1)
        n, item, N, r = flat.size, flat.dtype.itemsize, self.size, self.rank
        self._ensure(flat.nbytes)
        per = self.cap // item                         # elements per chunk
        align = max(_ALIGN // item, 1)
        uf = _UFUNCS[op]
        chunks = [(o, min(per, n - o)) for o in range(0, n, per)]
        dt = flat.dtype

        def bounds(m):
            q = -(-(-(-m // N)) // align) * align      # ceil(m/N), aligned
            return [(min(i * q, m), min((i + 1) * q, m)) for i in range(N)]

        def view(u8, m):
            return u8[:m * item].view(dt)

        def publish(k):
            o, m = chunks[k]
            slot = view(self.segs[r][k % 2], m)
            for i, (a, b) in enumerate(bounds(m)):
                if i != r and b > a:
                    np.copyto(slot[a:b], flat[o + a:o + b])

        def reduce(k):
            o, m = chunks[k]
            a, b = bounds(m)[r]
            if b <= a:
                return
            out = view(self.segs[r][2 + k % 2], b - a)
            srcs = [flat[o + a:o + b] if i == r else view(self.segs[i][k % 2], m)[a:b]
                    for i in range(N)]
            uf(srcs[0], srcs[1], out=out)
            for s in srcs[2:]:
                uf(out, s, out=out)

        def gather(k):
            o, m = chunks[k]
            for i, (a, b) in enumerate(bounds(m)):
                if b > a:
                    res = view(self.segs[i][2 + k % 2], b - a)
                    dst = flat[o + a:o + b]
                    if op == "avg":
                        if dt.kind == "f":
                            np.divide(res, N, out=dst)
                        else:
                            np.floor_divide(res, N, out=dst)
                    else:
                        np.copyto(dst, res)

        nk = len(chunks)
        for step in range(nk + 2):
            if step < nk:
                publish(step)
            if 0 <= step - 1 < nk:
                reduce(step - 1)
            if step >= 2:
                gather(step - 2)
            if step < nk + 1:
                self._sync()
        return x


class SharedWork:
    """A non-blocking all-reduce of a shared buffer (``ShmAllreduce.alloc``), in three steps:
    *arrive* (a non-blocking barrier: this rank's buffer is complete), *reduce* (once every
    rank arrived: this rank's slice, written into every rank's buffer) and *done* (a second
    non-blocking barrier: every slice is written). ``test()`` advances it without blocking
    (DDP calls it from its gradient hooks, so the reduction of one bucket overlaps the
    backward of the layers before it); ``wait()`` finishes it. Arrive barriers are posted in
    call order and done barriers in the same order (each kind on its own communicator), as
    MPI requires of non-blocking collectives."""

    def __init__(self, shm, x, op, scale, after=None):
        self.shm, self.x, self.op, self.scale = shm, x, op, scale
        self.after = after if after is not None and not after.finished else None
        self.win = shm._shared[x.__array_interface__["data"][0]][0]
        self.win.Sync()                       # my stores to the buffer, before I arrive
        self.arrived = shm.comm_arrive.Ibarrier()
        self.reduced = None                   # the done barrier, once my slice is written
        self.finished = False

    def _reduce(self):
        self.win.Sync()                       # the others' stores, now that they arrived
        self.shm._reduce_slice(self.x, self.op, self.scale)
        self.win.Sync()
        self.reduced = self.shm.comm_done.Ibarrier()

    def test(self):
        if self.finished:
            return True
        if self.reduced is None:
            if (self.after is not None and self.after.reduced is None) or \
                    not self.arrived.Test():
                return False
            self._reduce()
        if self.reduced.Test():
            self.win.Sync()
            self.finished, self.after = True, None
        return self.finished

    def wait(self):
        if self.finished:
            return True
        if self.reduced is None:
            if self.after is not None:
                self.after.wait()
            self.arrived.Wait()
            self._reduce()
        self.reduced.Wait()
        self.win.Sync()
        self.finished, self.after = True, None
        return True
