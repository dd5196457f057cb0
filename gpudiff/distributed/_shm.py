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
"""
import numpy as np

CHUNK_BYTES = 2 << 20          # bytes per chunk (per slot); see docs/DISTRIBUTED.md
MIN_BYTES = 1 << 20            # below this MPI's Allreduce (latency-bound) is as fast
_ALIGN = 64                    # bytes: slice boundaries on cache lines

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
        self.comm.Free()

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
