"""Settings of the CUDA backend (like ``torch.backends.cudnn``)::

    import gpudiff
    gpudiff.backends.cuda.conv_algorithm = "im2col"  # 'auto' | 'implicit_gemm' | 'im2col' | 'direct'
    with gpudiff.backends.cuda.use_conv_algorithm("direct"):  # for a block of code
        ...
    gpudiff.backends.cuda.last_conv_algorithm     # {'forward': 'implicit_gemm', ...}: what ran
    gpudiff.backends.cuda.conv_algorithm_counts   # Counter of (pass, algorithm)

The values live in gpudiff.backend.cuda_cnn (docs/CUDA_KERNELS.md explains the algorithms and
what 'auto' picks); this module reads and writes them there.
"""
import sys
import types

from ..backend import cuda_cnn

CONV_ALGORITHMS = cuda_cnn.CONV_ALGORITHMS
use_conv_algorithm = cuda_cnn.use_conv_algorithm
choose_conv_algorithm = cuda_cnn.choose_conv_algorithm
reset_conv_log = cuda_cnn.reset_conv_log


class _CudaSettings(types.ModuleType):
    @property
    def conv_algorithm(self):
        return cuda_cnn.conv_algorithm

    @conv_algorithm.setter
    def conv_algorithm(self, name):
        if name not in CONV_ALGORITHMS:
            raise ValueError(f"gpudiff.backends.cuda.conv_algorithm must be one of "
                             f"{CONV_ALGORITHMS}, got {name!r}")
        cuda_cnn.conv_algorithm = name

    @property
    def last_conv_algorithm(self):
        return dict(cuda_cnn.last_conv_algorithm)

    @property
    def conv_algorithm_counts(self):
        return cuda_cnn.conv_algorithm_counts


sys.modules[__name__].__class__ = _CudaSettings  # module attributes with setters
