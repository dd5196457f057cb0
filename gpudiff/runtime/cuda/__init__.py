"""The 'cuda' entries of the kernel table: one wrapper module per csrc/cuda/*.cu file.

  launch.py         launch(source, 'name<float>', grid, block, args, shared_mem) on CuPy (a GPU)
                    or the emulator; the launch configurations every wrapper shares
  trace.py          the emulator's memory-access trace (the memory-efficiency model)
  activations.py    activations.cu      softmax.py      softmax.cu
  cross_entropy.py  cross_entropy.cu    conv.py         conv.cu (+ im2col.cu and xp.matmul)
  im2col.py         im2col.cu           pool.py         pool.cu
  batch_norm.py     batch_norm.cu       optim.py        optim.cu (fused SGD / Adam steps)

Each wrapper takes the raw arrays of cuda tensors (CuPy on a GPU, NumPy on the emulated
device), picks the launch configuration and launches through launch.launch, so the same code
path runs on a GPU and in CI. Importing this package registers them (runtime/__init__.py does
when a cuda device exists).
"""
from . import (
    activations,
    batch_norm,
    conv,
    cross_entropy,
    im2col,
    optim,
    pool,
    softmax,
    tensor_core,
)

#: the modules whose ``launch`` a tool may wrap (tests record, the memory report traces)
WRAPPERS = (activations, batch_norm, conv, cross_entropy, im2col, optim, pool, softmax,
            tensor_core)
