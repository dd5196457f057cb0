"""Run under ``mpiexec -n 2`` (and ``-n 3``) by test_distributed.py: all_reduce through the
shared-memory window (_shm.py) equals MPI's Allreduce (SUM, AVG, MAX, MIN; float32, float64,
int64; sizes around the chunk edges; non-contiguous input; async_op), bitwise equal on every
rank; the window grows; buffers allocated in shared memory (DDP's buckets) reduce in place to
the same values, and DDP's gradients through them equal the staged path's. Prints "RANK r OK"."""
import hashlib

import numpy as np

import gpudiff as torch
import gpudiff.distributed as dist
from gpudiff.distributed import distributed_c10d as c10d

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
pg = c10d._get_pg()
assert pg.shm is not None, "all ranks are on one node: the shared-memory path must be on"
MPI = pg.MPI
pg.shm_min_bytes = 0            # every message through the window...
pg.shm.chunk_bytes = 1024       # ...cut into many small chunks (the pipeline, chunk edges)
OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


def mpi_reference(x, op):
    want = np.ascontiguousarray(x).copy()
    pg.comm.Allreduce(MPI.IN_PLACE, want, OPS[op])
    if op == "avg":
        want = want / world if want.dtype.kind == "f" else want // world
    return want.astype(x.dtype)


def same_everywhere(arr, what):
    digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    everyone = pg.comm.allgather(digest)
    assert len(set(everyone)) == 1, f"{what}: ranks differ"


rng = np.random.default_rng(100 + rank)
checks = 0
for dtype in (np.float32, np.float64, np.int64):
    item = np.dtype(dtype).itemsize
    per = 1024 // item                         # elements per chunk
    for n in (1, 2, 7, per - 1, per, per + 1, 3 * per, 3 * per + 5, 5000):
        if dtype == np.int64:
            x = rng.integers(-1000, 1000, n).astype(dtype)
        else:
            x = rng.standard_normal(n).astype(dtype)
        for op in ("sum", "avg", "max", "min"):
            t = torch.tensor(x.copy())
            dist.all_reduce(t, op=op)
            got, want = t.numpy(), mpi_reference(x, op)
            if world == 2 or dtype == np.int64 or op in ("max", "min"):
                # two operands: a + b == b + a exactly; integers, max, min: any order
                assert np.array_equal(got, want), (dtype, n, op, got[:4], want[:4])
            else:      # 3 ranks: MPI may add in another order
                np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32
                                           else 1e-13)
            same_everywhere(got, f"{dtype.__name__} n={n} {op}")
            checks += 1

# non-contiguous input, and async_op (run synchronously: the handle comes back complete)
base = rng.standard_normal((64, 48)).astype(np.float32)
t = torch.tensor(base.copy()).t()
assert not t.is_contiguous()
work = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)
assert work.is_completed() and work.wait()
assert np.array_equal(t.numpy(), mpi_reference(base.T, "avg"))
same_everywhere(t.numpy(), "non-contiguous avg")

# the default settings: a message over the default chunk size grows the window
pg.shm.chunk_bytes = 2 << 20
for n in (300_000, (2 << 20) // 4 + 3):
    x = rng.standard_normal(n).astype(np.float32)
    t = torch.tensor(x.copy())
    cap = pg.shm.cap
    dist.all_reduce(t)
    assert pg.shm.cap >= cap and np.array_equal(t.numpy(), mpi_reference(x, "sum")) \
        if world == 2 else np.allclose(t.numpy(), mpi_reference(x, "sum"), rtol=1e-5)
    same_everywhere(t.numpy(), f"n={n}")
assert pg.shm.cap == 2 << 20

# buffers in shared memory (alloc / allreduce_shared: DDP's buckets), read in place, cut
# into small pieces here so that piece and slice edges are crossed
from gpudiff.distributed import _shm
_shm._PIECE_BYTES, piece_default = 256, _shm._PIECE_BYTES
for dtype in (np.float32, np.float64, np.int64):
    for n in (1, 7, 64, 65, 1000, 4099):
        for op in ("sum", "avg", "max", "min"):
            buf = pg.shm.alloc(n, dtype)
            assert pg.shm.is_shared(buf) and not pg.shm.is_shared(buf[1:]) \
                and buf.shape == (n,) and not buf.any()
            x = (rng.integers(-1000, 1000, n) if dtype == np.int64
                 else rng.standard_normal(n)).astype(dtype)
            buf[...] = x
            pg.shm.allreduce_shared(buf, op)
            want = mpi_reference(x, op)
            if world == 2 or dtype == np.int64 or op in ("max", "min"):
                assert np.array_equal(buf, want), (dtype, n, op, buf[:4], want[:4])
            else:
                np.testing.assert_allclose(buf, want, rtol=1e-6 if dtype == np.float32
                                           else 1e-13)
            same_everywhere(buf, f"shared {dtype.__name__} n={n} {op}")
            checks += 1
buf = pg.shm.alloc(999, np.float32)
x = rng.standard_normal(999).astype(np.float32)
buf[...] = x
pg.shm.allreduce_shared(buf, "sum", scale=1.0 / world)      # DDP's sum, then 1/N
want = mpi_reference(x, "sum")
want *= 1.0 / world
assert np.array_equal(buf, want) if world == 2 else np.allclose(buf, want, rtol=1e-6)
_shm._PIECE_BYTES = piece_default

# DDP: its buckets in shared memory give the same gradients as the staged path (bitwise with
# 2 ranks: a sum of two is order-free), and a bucket under the threshold stays private
import gpudiff.nn as nn
from gpudiff.nn.parallel import DistributedDataParallel as DDP
grads = []
for shared in (True, False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5))
    pg.shm_min_bytes = 0 if shared else 1 << 40
    ddp = DDP(net, bucket_cap_mb=0.0005)
    assert len(ddp._buckets) >= 2 and all(b.shared == shared for b in ddp._buckets), \
        [(b.shared, b.nbytes) for b in ddp._buckets]
    xin = torch.tensor(np.random.default_rng(rank).standard_normal((8, 40)).astype(np.float32))
    ddp(xin).square().sum().backward()
    grads.append([p.grad.numpy().copy() for p in net.parameters()])
for g0, g1 in zip(*grads):
    assert np.array_equal(g0, g1) if world == 2 else np.allclose(g0, g1, rtol=1e-5)
    same_everywhere(g0, "DDP shared-bucket grads")

# the shared buckets' reduction does not hold up the backward: rank 1 starts its backward
# 0.5 s late; rank 0 launches every bucket at once and waits only at the end of backward
import time
torch.manual_seed(0)
pg.shm_min_bytes = 0
ddp = DDP(nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5)), bucket_cap_mb=0.0005)
assert len(ddp._buckets) >= 2 and all(b.shared for b in ddp._buckets)
launched, real = [], ddp._allreduce


def spy(b):
    launched.append(time.perf_counter())
    return real(b)


ddp._allreduce = spy
loss = ddp(xin).square().sum()
pg.comm.Barrier()
if rank == 1:
    time.sleep(0.5)
t0 = time.perf_counter()
loss.backward()
t1 = time.perf_counter()
if rank == 0:
    assert len(launched) == len(ddp._buckets), launched
    assert launched[-1] - t0 < 0.25, (t0, launched)   # all launched before rank 1 came
    assert t1 - t0 > 0.4, t1 - t0                       # and the end waited for it
grads = [p.grad.numpy().copy() for p in ddp.module.parameters()]
everyone = pg.comm.allgather([g.tobytes() for g in grads])
assert all(e == everyone[0] for e in everyone), "ranks' averaged gradients differ"

# bool and tiny messages still take MPI
pg.shm_min_bytes = 1 << 20
t = torch.ones(10)
dist.all_reduce(t)
assert t.tolist() == [float(world)] * 10
dist.destroy_process_group()
print(f"RANK {rank} OK ({checks} checks, world {world})", flush=True)
