"""Every .cu file, with every name expression the backend uses, compiles under NVRTC exactly as
CuPy's RawModule compiles it (same code string, same options), for compute_80 and compute_90.

libnvrtc comes from the nvidia-cuda-nvrtc wheel (the test extra), so no GPU is needed.
"""
import re

import pytest

from gpudiff.runtime.cuda import launch as cuda_launch
from nvrtc_util import NVRTC, find_libnvrtc

ARCHS = ["compute_80", "compute_90"]


@pytest.fixture(scope="module")
def nvrtc():
    path = find_libnvrtc()
    if path is None:
        pytest.skip("libnvrtc not found: install the nvidia-cuda-nvrtc wheel (pip install -e .[test])")
    return NVRTC(path)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source_file", cuda_launch.source_files())
def test_kernel_file_compiles_with_the_backend_options(nvrtc, source_file, arch):
    names = cuda_launch.name_expressions(source_file)
    assert names, f"{source_file} lists no GPUDIFF_KERNEL"
    options = (f"--gpu-architecture={arch}",) + cuda_launch.NVRTC_OPTIONS
    ptx, lowered, log = nvrtc.compile(cuda_launch.module_source(source_file), source_file,
                                      options, names)
    assert "warning" not in log.lower(), log
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    for name in names:
        assert lowered[name] in entries, f"{name} ({lowered[name]}) missing from the PTX"
    assert f".target sm_{arch[-2:]}" in ptx


def test_module_source_pastes_our_header_and_keeps_line_numbers():
    src = cuda_launch.module_source("softmax.cu")
    assert '#include "common.cuh"' not in src
    assert "struct RowTeam" in src
    assert '#line 1 "common.cuh"' in src and '#line ' in src.split("struct RowTeam")[1]


def test_the_emulator_registers_exactly_the_listed_names(host):
    # the GPUDIFF_KERNEL lines are the one list: CuPy's name_expressions and the emulator's
    # build must agree (a .cu without its csrc/cuda_host/kernels_*.cpp would show up here)
    listed = set()
    for f in cuda_launch.source_files():
        listed |= set(cuda_launch.name_expressions(f))
    assert set(host.kernel_names()) == listed
    assert host.kernel_signature("softmax_fwd<double>") == "(gptr<const f8>, gptr<f8>, i8, i4)"


def test_name_expressions_parse_the_kernel_lines():
    names = cuda_launch.name_expressions("activations.cu")
    assert names[:2] == ("relu_fwd<float>", "relu_fwd<double>")
    assert len(names) == 16 and len(set(names)) == 16
