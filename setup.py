"""Builds the two compiled parts of gpudiff with pybind11.

gpudiff._C          the CPU hot loops (csrc/cpu/*.cpp), OpenMP across cores, GIL released.
gpudiff._cuda_host  the CUDA kernels of csrc/cuda/*.cu compiled for the CPU emulator
                    (csrc/cuda_host/), so CI executes the same kernel source a GPU runs.

The .cu sources are also copied into the package (gpudiff/_cuda_src) so that CuPy's NVRTC
can compile them at run time on a real GPU.
"""
import glob
import os
import shutil

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _copy_cuda_sources():
    # package data for NVRTC at run time: one source for GPU and emulator
    dst = os.path.join(HERE, "gpudiff", "_cuda_src")
    os.makedirs(dst, exist_ok=True)
    for f in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu*")):
        shutil.copy2(f, dst)


_copy_cuda_sources()

# ---- gpudiff._C: CPU kernels ----------------------------------------------------------
cpu_ext = Pybind11Extension(
    "gpudiff._C",
    sorted(glob.glob("csrc/cpu/*.cpp")),
    include_dirs=["csrc/cpu"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
    extra_link_args=["-fopenmp"],
)

# ---- gpudiff._cuda_host: CUDA kernels on the CPU emulator -----------------------------
cuda_host_ext = Pybind11Extension(
    "gpudiff._cuda_host",
    sorted(glob.glob("csrc/cuda_host/*.cpp")),
    include_dirs=["csrc/cuda_host", "csrc/cuda"],
    cxx_std=17,
    extra_compile_args=["-O2"],
    depends=sorted(glob.glob("csrc/cuda/*") + glob.glob("csrc/cuda_host/*.h")),
)

exts = [e for e in (cpu_ext, cuda_host_ext) if e.sources]

# The kernel translation units of the emulator (csrc/cuda_host/kernels_*.cpp) get GCC's
# ThreadSanitizer instrumentation without its run-time library: every load and store of a
# kernel calls a __tsan_* hook, which csrc/cuda_host/sanitizer.cpp defines (bounds checks,
# racecheck, initcheck; docs/EMULATOR.md). Only those files: the scheduler must not be.
KERNEL_TU_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


class BuildExt(build_ext):
    def build_extensions(self):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if os.path.basename(src).startswith("kernels_") and "cuda_host" in src:
                extra_postargs = list(extra_postargs) + KERNEL_TU_FLAGS
            compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


setup(ext_modules=exts, cmdclass={"build_ext": BuildExt})
