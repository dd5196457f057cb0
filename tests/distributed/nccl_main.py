"""Run under ``mpiexec -n 2`` on a machine with 2 GPUs (gpu-marked test): NCCL collectives
on CuPy tensors and DDP on cuda vs one process. NOT YET RUN ON A GPU."""
import os

import numpy as np

import gpudiff as torch
import gpudiff.distributed as dist
import gpudiff.nn.functional as F
from gpudiff import nn
from gpudiff.nn.parallel import DistributedDataParallel as DDP

local = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
dev = torch.device(f"cuda:{local}")
dist.init_process_group("nccl", device_id=dev)
rank = dist.get_rank()
t = torch.ones(1000, device=dev) * (rank + 1)
dist.all_reduce(t)
assert float(t.sum().item()) == 3000.0
dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True).wait()
b = torch.full((5,), float(rank), device=dev)
dist.broadcast(b, 1)
assert b.tolist() == [1.0] * 5
out = [torch.zeros(2, device=dev) for _ in range(2)]
dist.all_gather(out, torch.full((2,), float(rank), device=dev))
assert [o.tolist() for o in out] == [[0.0, 0.0], [1.0, 1.0]]
rng = np.random.default_rng(0)
X = rng.standard_normal((3, 32, 1, 8, 8)).astype(np.float32)
Y = rng.integers(0, 10, (3, 32))


def run(ddp):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(512, 10)).to(dev)
    if ddp:
        net = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(net), device_ids=[local])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    lo, hi = (rank * 16, rank * 16 + 16) if ddp else (0, 32)
    for s in range(3):
        opt.zero_grad()
        F.cross_entropy(net(torch.tensor(X[s, lo:hi], device=dev)),
                        torch.tensor(Y[s, lo:hi], device=dev)).backward()
        opt.step()
    m = net.module if ddp else net
    return {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}


ref, got = run(False), run(True)
for k in ref:
    rel = np.abs(got[k] - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-12)
    assert rel < 1e-4, (k, rel)
print(f"RANK {rank} OK", flush=True)
