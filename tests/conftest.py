"""Test setup: the 'cuda' device of the tests is the CUDA emulator unless asked otherwise.

GPUDIFF_CUDA=emulate must be set before gpudiff is imported (the backend reads it once), so
the emulated CUDA code path runs in CI on every machine. GPUDIFF_TEST_REAL_GPU=1 leaves the
environment alone: 'cuda' is then a real GPU (tests on it carry the ``gpu`` marker).
"""
import os
import sys

if os.environ.get("GPUDIFF_TEST_REAL_GPU") != "1":
    os.environ["GPUDIFF_CUDA"] = "emulate"
    if "gpudiff" in sys.modules and not sys.modules["gpudiff"].runtime.cuda_mode():
        raise RuntimeError("gpudiff was imported before tests/conftest.py could select the "
                           "emulated CUDA device")

import numpy as np
import pytest

import gpudiff


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (gpudiff and NumPy)."""
    gpudiff.manual_seed(0)
    np.random.seed(0)
    yield
