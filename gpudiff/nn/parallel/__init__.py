"""gpudiff.nn.parallel: DistributedDataParallel (data parallelism over MPI / NCCL ranks)."""
from .distributed import DistributedDataParallel

__all__ = ["DistributedDataParallel"]
