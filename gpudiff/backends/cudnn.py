"""``gpudiff.backends.cudnn``: PyTorch's cuDNN switches, applied to our own convolution
kernels (CuPy 14 has no cuDNN: gpudiff's CUDA kernels play its role)::

    gpudiff.backends.cudnn.benchmark = True      # time the algorithms once per shape (GPU)
    gpudiff.backends.cudnn.enabled = False       # convolutions take the im2col + GEMM path
    gpudiff.backends.cudnn.deterministic = True  # accepted: every kernel of ours already is
    gpudiff.backends.cudnn.allow_tf32 = True     # float32 convolutions on the TF32 tensor cores

- ``benchmark`` (default False): with ``gpudiff.backends.cuda.conv_algorithm = 'auto'`` on
  a real GPU, each convolution pass times implicit GEMM, im2col + cuBLAS and the direct
  kernels once per geometry and dtype (CUDA events) and keeps the fastest; on the emulated
  device, whose times say nothing about a GPU's, the heuristic decides. Not yet run on a GPU.
- ``enabled`` (default True): False makes the convolution ops skip our CUDA convolution
  kernels and run their reference (im2col kernel + xp.matmul + col2im).
- ``deterministic`` (default False): our kernels are bitwise reproducible run to run (no
  atomics, fixed reduction orders) whatever this says.
- ``allow_tf32`` (default True, as PyTorch's): float32 convolutions on CUDA run the TF32
  tensor-core implicit GEMM (csrc/cuda/tensor_core.cu: operands rounded to TF32 with
  cvt.rna.tf32.f32, 10 mantissa bits, fp32 accumulation), except depthwise ones (direct, FP32)
  and forced 'im2col' / 'direct' algorithms; False keeps every float32 convolution in FP32.
  float16 / bfloat16 convolutions always use the FP16 / BF16 tensor cores.
"""
import sys
import types

from .. import runtime as _runtime
from ..runtime.cuda import conv as _conv


def is_available():
    """Whether the convolution kernels standing in for cuDNN can run (a GPU or the emulator)."""
    return _runtime.cuda_mode() is not None


def version():
    return None  # no cuDNN library: our own kernels


class _CudnnSettings(types.ModuleType):
    deterministic = False

    @property
    def allow_tf32(self):
        return _conv.allow_tf32

    @allow_tf32.setter
    def allow_tf32(self, flag):
        _conv.allow_tf32 = bool(flag)

    @property
    def benchmark(self):
        return _conv.benchmark

    @benchmark.setter
    def benchmark(self, flag):
        _conv.benchmark = bool(flag)

    @property
    def enabled(self):
        return _conv.enabled

    @enabled.setter
    def enabled(self, flag):
        _conv.enabled = bool(flag)


sys.modules[__name__].__class__ = _CudnnSettings  # module attributes with setters
