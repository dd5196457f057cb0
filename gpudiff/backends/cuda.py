"""Settings of the CUDA backend (like ``torch.backends.cudnn``)::

    import gpudiff
    gpudiff.backends.cuda.conv_algorithm = "im2col"  # 'auto' | 'implicit_gemm' | 'im2col' | 'direct'
    with gpudiff.backends.cuda.use_conv_algorithm("direct"):  # for a block of code
        ...
    gpudiff.backends.cuda.last_conv_algorithm     # {'forward': 'implicit_gemm', ...}: what ran
    gpudiff.backends.cuda.conv_algorithm_counts   # Counter of (pass, algorithm)

The values live in gpudiff.runtime.cuda.conv (docs/CUDA_KERNELS.md explains the algorithms and
what 'auto' picks); this module reads and writes them there.
"""
import sys
import types

from ..runtime.cuda import conv as cuda_conv
from ..runtime.cuda import tensor_core as cuda_tensor_core

CONV_ALGORITHMS = cuda_conv.CONV_ALGORITHMS
use_conv_algorithm = cuda_conv.use_conv_algorithm
choose_conv_algorithm = cuda_conv.choose_conv_algorithm
reset_conv_log = cuda_conv.reset_conv_log


class _MatmulSettings:
    """``gpudiff.backends.cuda.matmul``: PyTorch's matmul switches. ``allow_tf32`` (default
    False, as PyTorch's): float32 2-D matmuls and linear layers on CUDA run the TF32
    tensor-core GEMM (csrc/cuda/tensor_core.cu) instead of cuBLAS / NumPy FP32. float16 /
    bfloat16 ones always use the tensor cores (fp32 accumulation). The reduced-precision
    reduction switches are accepted and kept (our GEMMs always accumulate in fp32)."""

    def __init__(self):
        self.allow_fp16_reduced_precision_reduction = True
        self.allow_bf16_reduced_precision_reduction = True

    @property
    def allow_tf32(self):
        return cuda_tensor_core.matmul_allow_tf32

    @allow_tf32.setter
    def allow_tf32(self, flag):
        cuda_tensor_core.matmul_allow_tf32 = bool(flag)


matmul = _MatmulSettings()


class _CudaSettings(types.ModuleType):
    @property
    def conv_algorithm(self):
        return cuda_conv.conv_algorithm

    @conv_algorithm.setter
    def conv_algorithm(self, name):
        if name not in CONV_ALGORITHMS:
            raise ValueError(f"gpudiff.backends.cuda.conv_algorithm must be one of "
                             f"{CONV_ALGORITHMS}, got {name!r}")
        cuda_conv.conv_algorithm = name

    @property
    def last_conv_algorithm(self):
        return dict(cuda_conv.last_conv_algorithm)

    @property
    def conv_algorithm_counts(self):
        return cuda_conv.conv_algorithm_counts


sys.modules[__name__].__class__ = _CudaSettings  # module attributes with setters
