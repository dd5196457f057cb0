"""NCCL for CuPy tensors: cupy.cuda.nccl (the library from the nvidia-nccl-cu13 wheel).

NOT YET RUN ON A GPU: written against CuPy's documented NcclCommunicator API and tested
only by the gpu-marked tests in tests/distributed/, which skip without a GPU.

One communicator per process group, made once: rank 0 asks NCCL for a unique id, MPI
broadcasts it (ChainerMN's pure_nccl communicator did the same), every rank joins with
``NcclCommunicator(size, uid, rank)``. Collectives run on a side stream: the side stream
first waits for the work already queued on the caller's stream (an event), runs the NCCL
call, and records an event that ``Work.wait()`` makes the caller's stream wait for, so the
host never blocks and compute on the main stream overlaps the transfer.
"""


class NcclComm:
    def __init__(self, mpi_comm, rank, size, device_index):
        import cupy
        from cupy.cuda import nccl
        self.cupy, self.nccl = cupy, nccl
        self.rank, self.size = rank, size
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = mpi_comm.bcast(uid, root=0)          # a tuple of bytes: pickled once, at setup
        self.device = cupy.cuda.Device(device_index)
        with self.device:
            self.comm = nccl.NcclCommunicator(size, uid, rank)
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._dtypes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
                        "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32,
                        "int64": nccl.NCCL_INT64, "uint8": nccl.NCCL_UINT8,
                        "int8": nccl.NCCL_INT8}
        self._ops = {"sum": nccl.NCCL_SUM, "avg": nccl.NCCL_SUM, "max": nccl.NCCL_MAX,
                     "min": nccl.NCCL_MIN, "product": nccl.NCCL_PROD}

    def _dtype(self, a):
        try:
            return self._dtypes[a.dtype.name]
        except KeyError:
            raise TypeError(f"NCCL cannot reduce {a.dtype} tensors") from None

    def _begin(self):
        cupy = self.cupy
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)

    def _end(self):
        done = self.cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return done

    @staticmethod
    def _check(a):
        if not a.flags.c_contiguous:
            raise ValueError("NCCL collectives need contiguous tensors (call .contiguous())")

    def all_reduce(self, a, op):
        self._check(a)
        with self.device:
            self._begin()
            self.comm.allReduce(a.data.ptr, a.data.ptr, a.size, self._dtype(a), self._ops[op],
                                self.stream.ptr)
            if op == "avg":
                with self.stream:
                    a /= self.size
            return self._end()

    def broadcast(self, a, src):
        self._check(a)
        with self.device:
            self._begin()
            self.comm.bcast(a.data.ptr, a.size, self._dtype(a), src, self.stream.ptr)
            return self._end()

    def all_gather(self, inp, out):
        self._check(out)
        inp = self.cupy.ascontiguousarray(inp)
        with self.device:
            self._begin()
            self.comm.allGather(inp.data.ptr, out.data.ptr, inp.size, self._dtype(inp),
                                self.stream.ptr)
            return self._end()

    def reduce_scatter(self, inp, out, op):
        self._check(out)
        inp = self.cupy.ascontiguousarray(inp)
        with self.device:
            self._begin()
            self.comm.reduceScatter(inp.data.ptr, out.data.ptr, out.size, self._dtype(out),
                                    self._ops[op], self.stream.ptr)
            if op == "avg":
                with self.stream:
                    out /= self.size
            return self._end()

    def close(self):
        import contextlib
        with contextlib.suppress(Exception):   # a communicator already gone
            self.comm.destroy()
