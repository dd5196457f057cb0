"""Run under ``mpiexec -n 2`` by test_distributed.py: ``raise`` (rank 1 raises in the middle
of a DDP training epoch), ``mismatch`` (rank 1 builds a different model), ``timeout`` (rank
1 never joins an all_reduce; the timeout is 2 s). Each must end the whole job, non-zero."""
import sys
import time

import numpy as np

import gpudiff as torch
import gpudiff.distributed as dist
import gpudiff.nn.functional as F
from gpudiff import nn
from gpudiff.nn.parallel import DistributedDataParallel as DDP

mode = sys.argv[1]
dist.init_process_group("gloo", timeout=2.0 if mode == "timeout" else None)
rank = dist.get_rank()

if mode == "timeout":
    if rank == 1:
        time.sleep(60)
    dist.all_reduce(torch.ones(3))
    print("unreachable", flush=True)
    sys.exit(0)

width = 20 if (mode == "mismatch" and rank == 1) else 10
model = DDP(nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rng = np.random.default_rng(rank)
for step in range(1000):
    if mode == "raise" and rank == 1 and step == 5:
        raise ValueError("rank 1 failed on purpose at step 5")
    x = torch.tensor(rng.standard_normal((16, 8)).astype(np.float32))
    y = torch.tensor(rng.integers(0, 3, 16))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
print("unreachable", flush=True)
