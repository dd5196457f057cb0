"""Run under ``mpiexec -n 2`` by test_distributed.py (GPUDIFF_CUDA=emulate): every collective
on cpu and emulated cuda, DDP == one process on the whole batch (plain layers, SyncBatchNorm,
a weight used twice, no_sync, several bucket sizes), DistributedSampler's partition.
Prints "RANK r OK" at the end; any failure raises (and the excepthook ends the job)."""
import numpy as np

import gpudiff as torch
import gpudiff.distributed as dist
import gpudiff.nn.functional as F
from gpudiff import nn
from gpudiff.nn.parallel import DistributedDataParallel as DDP
from gpudiff.utils.data import DistributedSampler

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2 and dist.is_initialized() and dist.get_backend() == "gloo"


def close(a, b, tol=1e-5, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
    assert rel <= tol, f"{what}: relative difference {rel:.3g} > {tol}"
    return rel


# ---- collectives -------------------------------------------------------------------------
for dev in ("cpu", "cuda"):
    base = torch.arange(6, dtype=torch.float32, device=dev).reshape(2, 3)
    for op, want in ((dist.ReduceOp.SUM, lambda a, b: a + b),
                     (dist.ReduceOp.AVG, lambda a, b: (a + b) / 2),
                     (dist.ReduceOp.MAX, np.maximum), (dist.ReduceOp.MIN, np.minimum)):
        t = base * (rank + 1)
        dist.all_reduce(t, op=op)
        close(t.cpu().numpy(), want(base.cpu().numpy(), 2 * base.cpu().numpy()), 0, f"{op} {dev}")
    t = base * (rank + 1)
    work = dist.all_reduce(t, async_op=True)
    assert work.wait() and work.is_completed()
    close(t.cpu().numpy(), 3 * base.cpu().numpy(), 0, "async")
    t = (base * (rank + 1)).t()                       # not contiguous
    dist.all_reduce(t)
    close(t.cpu().numpy(), 3 * base.cpu().numpy().T, 0, "non-contiguous")
    i = torch.tensor([rank + 1, 10 * rank], dtype=torch.int64, device=dev)
    dist.all_reduce(i, op=dist.ReduceOp.MAX)
    assert i.tolist() == [2, 10], i
    b = torch.full((4,), float(rank), device=dev)
    dist.broadcast(b, src=1)
    assert b.tolist() == [1.0] * 4
    b = torch.full((4,), float(rank), device=dev)
    dist.broadcast(b, src=0, async_op=True).wait()
    assert b.tolist() == [0.0] * 4
    out = [torch.zeros(2, 2, device=dev) for _ in range(world)]
    dist.all_gather(out, torch.full((2, 2), float(rank + 1), device=dev))
    assert [o.sum().item() for o in out] == [4.0, 8.0]
    flat = torch.zeros(4, device=dev)
    dist.all_gather_into_tensor(flat, torch.full((2,), float(rank), device=dev))
    assert flat.tolist() == [0.0, 0.0, 1.0, 1.0]
    o = torch.zeros(3, device=dev)
    dist.reduce_scatter(o, [torch.full((3,), float(10 * r + rank), device=dev)
                            for r in range(world)])
    assert o.tolist() == [float(20 * rank + 1)] * 3, o
    o = torch.zeros(2, device=dev)
    dist.reduce_scatter_tensor(o, torch.arange(4, dtype=torch.float32, device=dev),
                               op=dist.ReduceOp.AVG, async_op=True).wait()
    assert o.tolist() == [2.0 * rank, 2.0 * rank + 1], o
    dist.barrier()
    dist.barrier(async_op=True).wait()
objs = [None, None]
dist.all_gather_object(objs, {"rank": rank})
assert objs == [{"rank": 0}, {"rank": 1}]

# ---- DDP == one process on the whole batch -----------------------------------------------
rng = np.random.default_rng(0)
STEPS, B = 4, 64
X = rng.standard_normal((STEPS, B, 1, 8, 8)).astype(np.float32)
Y = rng.integers(0, 10, (STEPS, B))


class Twice(nn.Module):
    """A weight used twice in one forward (its gradient arrives in two parts)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(F.relu(self.fc(x)))


def make_net(bn):
    norm = [nn.BatchNorm2d(8)] if bn else []
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10),
                         Twice())


def run(bn, ddp, bucket_cap_mb=25, dev="cpu", steps=STEPS, accumulate=False):
    torch.manual_seed(0 if (rank == 0 or not ddp) else 1234)   # rank 1 starts different
    net = make_net(bn).to(dev)
    if ddp:
        if bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = DDP(net, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    lo, hi = (rank * B // 2, (rank + 1) * B // 2) if ddp else (0, B)
    for s in range(steps):
        x = torch.tensor(X[s, lo:hi], device=dev)
        y = torch.tensor(Y[s, lo:hi], device=dev)
        opt.zero_grad()
        if accumulate:     # two micro-batches: the first without all-reduce
            x2 = torch.tensor(X[(s + 1) % STEPS, lo:hi], device=dev)
            y2 = torch.tensor(Y[(s + 1) % STEPS, lo:hi], device=dev)
            if ddp:
                with net.no_sync():
                    F.cross_entropy(net(x2), y2).backward()
            else:
                F.cross_entropy(net(x2), y2).backward()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    m = net.module if ddp else net
    return {k: v.detach().cpu().numpy().copy() for k, v in m.state_dict().items()}, net


for bn in (False, True):
    ref, _ = run(bn, ddp=False)
    for cap in (25, 0.001):     # one bucket per parameter with the tiny cap
        got, net = run(bn, ddp=True, bucket_cap_mb=cap)
        worst = max(close(got[k], ref[k], 1e-5, f"bn={bn} cap={cap} {k}") for k in ref)
        if rank == 0:
            print(f"DDP bn={bn} bucket_cap_mb={cap}: {len(net._bucket_summary())} bucket(s), "
                  f"max relative difference {worst:.2e}", flush=True)
    assert next(iter(net.state_dict())).startswith("module."), list(net.state_dict())[:2]
ref, _ = run(False, ddp=False, accumulate=True)
got, _ = run(False, ddp=True, accumulate=True)
for k in ref:
    close(got[k], ref[k], 1e-5, f"no_sync {k}")
ref, _ = run(True, ddp=False, dev="cuda", steps=2)
got, _ = run(True, ddp=True, dev="cuda", steps=2)
for k in ref:
    close(got[k], ref[k], 1e-5, f"emulated cuda {k}")

# buckets: reverse registration order, first bucket small
net = DDP(nn.Sequential(nn.Linear(600, 600), nn.Linear(600, 10)), bucket_cap_mb=1)
names = [n for _, _, ns in net._bucket_summary() for n in ns]
assert names == ["1.bias", "1.weight", "0.bias", "0.weight"], names

# ---- DistributedSampler ------------------------------------------------------------------
shares = [None, None]
s = DistributedSampler(range(101), shuffle=True, seed=3)
assert s.num_replicas == 2 and s.rank == rank and len(s) == 51
e0 = list(s)
s.set_epoch(1)
e1 = list(s)
dist.all_gather_object(shares, (e0, e1))
(a0, a1), (b0, b1) = shares
assert sorted(set(a0) | set(b0)) == list(range(101)) and len(set(a0) & set(b0)) == 1
assert a0 != a1 and sorted(set(a1) | set(b1)) == list(range(101))
print(f"RANK {rank} OK", flush=True)
dist.destroy_process_group()
assert not dist.is_initialized()
