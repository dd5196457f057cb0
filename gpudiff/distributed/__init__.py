"""gpudiff.distributed: torch.distributed's process group and collectives, on MPI and NCCL.

>>> import gpudiff.distributed as dist
>>> dist.is_initialized()
False

Launch N ranks with ``mpiexec -n N python script.py`` (or ``gpudiff train --nproc N``); in
the script call ``dist.init_process_group("gloo")`` (or "mpi", or "nccl" on GPUs). See
docs/DISTRIBUTED.md. Importing this package does not initialise MPI; init_process_group
does.
"""
from .distributed_c10d import (
    Backend,
    ReduceOp,
    Work,
    all_gather,
    all_gather_into_tensor,
    all_gather_object,
    all_reduce,
    barrier,
    broadcast,
    broadcast_object_list,
    destroy_process_group,
    get_backend,
    get_rank,
    get_world_size,
    init_process_group,
    is_available,
    is_gloo_available,
    is_initialized,
    is_mpi_available,
    is_nccl_available,
    reduce_scatter,
    reduce_scatter_tensor,
)

__all__ = [
    "Backend", "ReduceOp", "Work", "all_gather", "all_gather_into_tensor",
    "all_gather_object", "all_reduce", "barrier", "broadcast", "broadcast_object_list",
    "destroy_process_group", "get_backend", "get_rank", "get_world_size",
    "init_process_group", "is_available", "is_gloo_available", "is_initialized",
    "is_mpi_available", "is_nccl_available", "reduce_scatter", "reduce_scatter_tensor",
]
