"""Fixtures for the CUDA kernel tests: where a kernel runs is a test parameter.

``where`` is one of 'forward', 'reverse', 'random' (the CPU emulator with that thread order
between sync points) or 'gpu' (CuPy on a real GPU, marked ``gpu``, skipped without one).
"""
import importlib
import os

import numpy as np
import pytest

from gpudiff.runtime.cuda import launch as cuda_launch


def gpu_available():
    try:
        cupy = importlib.import_module("cupy")
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device
        return False


class Emulated:
    """Arrays stay NumPy: cuda_launch runs kernels in the emulator."""
    gpu = False

    def __init__(self, order):
        self.order = order

    def put(self, a):
        return np.array(a, order="C")  # a copy; keeps 0-d arrays 0-d

    def get(self, a):
        return np.asarray(a)


class OnGPU:
    """Arrays go to the GPU with CuPy: cuda_launch runs kernels there."""
    gpu = True
    order = "gpu"

    def __init__(self):
        self.cupy = importlib.import_module("cupy")

    def put(self, a):
        return self.cupy.asarray(a)

    def get(self, a):
        return self.cupy.asnumpy(a)


WHERE = ["forward", "reverse", "random", pytest.param("gpu", marks=pytest.mark.gpu)]

# The emulator's racecheck and initcheck are on for every test of our kernels (bounds checks
# always are): a race or a read of uninitialised memory fails the launch that has it.
# GPUDIFF_EMULATOR=check=... overrides (check=none to measure their cost).
KERNEL_TEST_CHECKS = "race+init"


@pytest.fixture(autouse=True)
def emulator_checks():
    if "check" in os.environ.get("GPUDIFF_EMULATOR", ""):
        yield
        return
    with cuda_launch.emulator(check=KERNEL_TEST_CHECKS):
        yield


@pytest.fixture(params=WHERE)
def where(request):
    if request.param == "gpu":
        if not gpu_available():
            pytest.skip("needs CuPy and an NVIDIA GPU")
        yield OnGPU()
        return
    with cuda_launch.emulator(order=request.param, seed=1234):
        yield Emulated(request.param)


@pytest.fixture
def host():
    """gpudiff._cuda_host, the emulator extension (a build error, not a skip, if missing)."""
    return importlib.import_module("gpudiff._cuda_host")


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels the wrappers (gpudiff.runtime.cuda.*) launch during a test."""
    from gpudiff.runtime import cuda as rc
    names = []
    for module in rc.WRAPPERS:
        def spy(source_file, name, *args, _real=module.launch, **kw):
            names.append(name)
            return _real(source_file, name, *args, **kw)
        monkeypatch.setattr(module, "launch", spy)
    return names
