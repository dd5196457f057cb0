"""The emulator as a sanitizer: bounds checks, racecheck and initcheck (docs/EMULATOR.md),
through the seeded-bug kernels of csrc/cuda/selftest.cu.

The tests of tests/cuda run with check=race+init (conftest.py); here each test says what it
checks. The correct kernels also run on a real GPU (``where='gpu'``).
"""
import numpy as np
import pytest

from gpudiff.runtime.cuda import launch as cuda_launch
from gpudiff.runtime.cuda.launch import launch

ST = "selftest.cu"
ORDERS = ["forward", "reverse", "random"]
CHECKED = dict(check="race+init", seed=11)


# ---- correct kernels: clean under every check, in every order, and on a GPU ----------------
def test_static_shared_spelling_works(where):
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    y = where.put(np.zeros_like(x))
    launch(ST, "static_shared_copy", 3, 32, (where.put(x), y))
    np.testing.assert_array_equal(where.get(y), 2 * x)


@pytest.mark.parametrize("n", [32, 256, 1024])
def test_tree_sum_with_its_barriers_is_race_free(where, n):
    x = np.random.default_rng(n).integers(-8, 8, size=(4, n)).astype(np.float32)
    y = where.put(np.zeros(4, np.float32))
    launch(ST, "tree_sum", 4, n, (where.put(x), y, np.int32(1)))
    np.testing.assert_array_equal(where.get(y), x.sum(1))


def test_warp_exchange_with_syncwarp_is_race_free(where):
    y = where.put(np.zeros(64, np.int32))
    launch(ST, "warp_exchange", 2, 32, (y, np.int32(1)))
    lane = np.arange(32) ^ 1
    np.testing.assert_array_equal(where.get(y), np.concatenate([3 * lane, 3 * lane + 1]))


# `extern __shared__ T s[];` (the cuda-samples spelling of dynamic shared memory): the emulator
# build compiles each such declaration as the launch's dynamic shared memory (setup.py)
@pytest.mark.parametrize("n", [1000, 4096])
def test_extern_shared_reduction_as_in_cuda_samples(where, n):
    x = np.random.default_rng(n).integers(-8, 8, size=n).astype(np.float32)
    blocks = -(-n // 256)
    y = where.put(np.zeros(blocks, np.float32))
    launch(ST, "extern_shared_sum", blocks, 256, (where.put(x), y, np.int64(n), np.int32(1)),
           shared_mem=256 * 4)
    expect = np.concatenate([x, np.zeros(blocks * 256 - n, np.float32)]).reshape(blocks, 256)
    np.testing.assert_array_equal(where.get(y), expect.sum(1))


def test_extern_shared_arrays_of_a_kernel_alias(where):
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    bits = where.put(np.zeros((3, 64), np.int32))
    launch(ST, "extern_shared_alias", 3, 64, (where.put(x), bits), shared_mem=64 * 4)
    np.testing.assert_array_equal(where.get(bits), x[:, ::-1].view(np.int32))


@pytest.mark.parametrize("order", ORDERS)
def test_atomics_do_not_race_with_atomics(order):
    x = np.random.default_rng(2).integers(0, 20, size=2000).astype(np.int32)
    hist, mx = np.zeros(20, np.int32), np.full(1, -1, np.int32)
    with cuda_launch.emulator(order=order, **CHECKED):
        launch(ST, "atomic_hist", 4, 64, (x, hist, mx, np.int64(x.size)))
    np.testing.assert_array_equal(hist, np.bincount(x, minlength=20))


# ---- racecheck ----------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_forgotten_atomic_is_a_race_across_threads_and_blocks(host, order):
    x = np.ones(256, np.float32)
    total = np.zeros(1, np.float32)
    with cuda_launch.emulator(order=order, check=""):  # unchecked: right in every order
        launch(ST, "forgotten_atomic", 2, 128, (x, total, np.int64(256)))
    assert total[0] == 256
    with cuda_launch.emulator(order=order, **CHECKED):
        with pytest.raises(host.KernelError, match=r"kernel 'forgotten_atomic': racecheck: "
                                                    r"(read-after-write|write-write|write-after-"
                                                    r"read) hazard on argument 1 \(a f4 array of "
                                                    r"4 bytes\) at byte offset 0: thread \(\d+, "
                                                    r"0, 0\) of block \(0, 0, 0\) .* thread "
                                                    r"\(\d+, 0, 0\) of block \(0, 0, 0\)"):
            launch(ST, "forgotten_atomic", 2, 128, (x, total, np.int64(256)))
        # one thread per block: the two blocks still conflict (they run concurrently)
        with pytest.raises(host.KernelError, match=r"block \(1, 0, 0\) .* block \(0, 0, 0\) .*"
                                                    r"another block of the same launch"):
            launch(ST, "forgotten_atomic", 2, 1, (x, total, np.int64(2)))


def test_benign_races_opt_out_is_per_launch(host):
    x, total = np.ones(64, np.float32), np.zeros(1, np.float32)
    with cuda_launch.emulator(**CHECKED):
        launch(ST, "forgotten_atomic", 1, 64, (x, total, np.int64(64)), benign_races=True)
        with pytest.raises(host.KernelError, match="racecheck"):
            launch(ST, "forgotten_atomic", 1, 64, (x, total, np.int64(64)))
    assert total[0] == 64


@pytest.mark.parametrize("order", ORDERS)
def test_missing_barrier_is_a_shared_memory_race_in_every_order(host, order):
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    y = np.zeros_like(x)
    with cuda_launch.emulator(order=order, check="race", seed=4):
        with pytest.raises(host.KernelError, match=r"kernel 'rotate_block': racecheck: "
                                                    r"(read-after-write|write-after-read) hazard "
                                                    r"on shared variable 'rotate_block::s' at "
                                                    r"byte offset \d+: thread \(\d+, 0, 0\) of "
                                                    r"block \(0, 0, 0\) (reads|writes) it"):
            launch(ST, "rotate_block", 2, 64, (x, y, np.int32(0)))


@pytest.mark.parametrize("order", ORDERS)
def test_tree_without_its_barrier_is_a_race(host, order):
    x = np.ones((1, 128), np.float32)
    y = np.zeros(1, np.float32)
    with cuda_launch.emulator(order=order, **CHECKED):
        with pytest.raises(host.KernelError, match=r"tree_sum.*hazard on shared variable "
                                                    r"'tree_sum::s'"):
            launch(ST, "tree_sum", 1, 128, (x, y, np.int32(0)))


@pytest.mark.parametrize("order", ORDERS)
def test_warp_synchronous_code_needs_syncwarp(host, order):
    y = np.zeros(32, np.int32)
    # race only: with initcheck too, a lane that reads before its neighbour wrote (forward
    # order) is reported as reading uninitialised memory first
    with cuda_launch.emulator(order=order, check="race"):
        with pytest.raises(host.KernelError, match=r"warp_exchange.*hazard on shared variable "
                                                    r"'warp_exchange::s'.*in the same warp with "
                                                    r"no __syncwarp\(\)"):
            launch(ST, "warp_exchange", 1, 32, (y, np.int32(0)))


@pytest.mark.parametrize("order", ORDERS)
def test_extern_shared_reduction_without_its_barrier_is_a_race(host, order):
    x = np.ones(128, np.float32)
    y = np.zeros(1, np.float32)
    with cuda_launch.emulator(order=order, **CHECKED):
        with pytest.raises(host.KernelError, match=r"kernel 'extern_shared_sum': racecheck: "
                                                    r"(read-after-write|write-after-read) hazard "
                                                    r"on dynamic shared memory at byte offset"):
            launch(ST, "extern_shared_sum", 1, 128, (x, y, np.int64(128), np.int32(0)),
                   shared_mem=128 * 4)


# ---- bounds: always on --------------------------------------------------------------------
def test_static_shared_overflow_is_caught_at_once(host):
    y = np.zeros(33, np.float32)
    with cuda_launch.emulator(check=""):
        with pytest.raises(host.KernelError, match=r"kernel 'static_shared_overflow', block "
                                                    r"\(0, 0, 0\), thread \(32, 0, 0\): "
                                                    r"out-of-bounds access to shared variable "
                                                    r"'static_shared_overflow::s' \(128 bytes\): "
                                                    r"a 4-byte write at byte offset 128"):
            launch(ST, "static_shared_overflow", 1, 33, (y,))
        launch(ST, "static_shared_overflow", 1, 32, (y,))  # in bounds: fine
    assert (y[:32] == 1).all()


def test_raw_pointer_write_outside_an_array_is_caught_at_once(host):
    y = np.zeros(100, np.float32)
    with pytest.raises(host.KernelError, match=r"kernel 'oob_write' wrote outside argument 0 "
                                                r"\(a f4 array of 400 bytes\): a 4-byte access "
                                                r"at byte offset 412 \(thread \(0, 0, 0\) of "
                                                r"block \(0, 0, 0\), through a raw pointer\)"):
        launch(ST, "oob_write", 1, 32, (y, np.int64(100), np.int64(3)))


def test_dynamic_shared_overflow_names_the_thread(host):
    with pytest.raises(host.KernelError, match=r"dynamic_overflow', block \(0, 0, 0\), thread "
                                                r"\(63, 0, 0\): wrote outside its 256 bytes of "
                                                r"dynamic shared memory: a 4-byte access at byte "
                                                r"offset 256"):
        launch(ST, "dynamic_overflow", 1, 64, (np.zeros(64, np.float32),), shared_mem=256)


def test_extern_shared_overflow_is_caught_like_dynamic_shared_overflow(host):
    y = np.zeros(64, np.float32)
    with pytest.raises(host.KernelError, match=r"extern_shared_shift', block \(0, 0, 0\), "
                                                r"thread \(63, 0, 0\): wrote outside its 256 "
                                                r"bytes of dynamic shared memory: a 4-byte "
                                                r"access at byte offset 256"):
        launch(ST, "extern_shared_shift", 1, 64, (y,), shared_mem=256)


# ---- initcheck and poison -----------------------------------------------------------------
def test_static_shared_memory_is_poisoned_in_every_block(host):
    y = np.zeros((3, 64), np.float32)
    with cuda_launch.emulator(check=""):
        launch(ST, "shared_read_before_write", 3, 64, (y,))
    assert np.isnan(y).all()  # not zeros on first use, not the previous block's data after
    with cuda_launch.emulator(**CHECKED):
        with pytest.raises(host.KernelError, match=r"shared_read_before_write', block \(0, 0, "
                                                    r"0\), thread \(\d+, 0, 0\): initcheck: read "
                                                    r"of uninitialised shared memory: shared "
                                                    r"variable 'shared_read_before_write::s'"):
            launch(ST, "shared_read_before_write", 3, 64, (y,))


def test_extern_shared_memory_is_poisoned_in_every_block(host):
    y = np.zeros((3, 64), np.float32)
    with cuda_launch.emulator(check=""):  # one float more: in bounds, sdata[0] never written
        launch(ST, "extern_shared_shift", 3, 64, (y,), shared_mem=65 * 4)
    assert np.isnan(y[:, 0]).all()  # every block, not only the first
    np.testing.assert_array_equal(y[:, 1:], np.tile(np.arange(63, dtype=np.float32), (3, 1)))
    with cuda_launch.emulator(**CHECKED):
        with pytest.raises(host.KernelError, match=r"extern_shared_shift', block \(0, 0, 0\), "
                                                    r"thread \(0, 0, 0\): initcheck: read of "
                                                    r"uninitialised shared memory: dynamic shared "
                                                    r"memory at byte offset 0"):
            launch(ST, "extern_shared_shift", 3, 64, (y,), shared_mem=65 * 4)


def test_reading_a_poisoned_float_array_is_flagged(host):
    x = np.full(8, np.nan, np.float32)
    x.view(np.uint32)[:] = 0xFFFFFFFF  # what an empty() array holds on the emulated device
    y = np.zeros(8, np.float32)
    with cuda_launch.emulator(**CHECKED):
        with pytest.raises(host.KernelError, match=r"relu_fwd<float>'.*initcheck: read of "
                                                    r"uninitialised global memory: argument 0 \(a "
                                                    r"f4 array of 32 bytes\) at byte offset \d+"):
            launch("activations.cu", "relu_fwd<float>", 1, 32, (x, y, np.int64(8)))
        x[:] = 1.0
        launch("activations.cu", "relu_fwd<float>", 1, 32, (x, y, np.int64(8)))
    assert (y == 1).all()


def test_the_checker_knows_the_static_shared_variables(host):
    names = dict(line.rsplit(": ", 1) for line in host.shared_variables().splitlines())
    assert names["rotate_block::s"] == "4096"
    assert names["static_shared_copy::s"] == "128"
    assert any(n.startswith("gd::block_allreduce<gd::Sum<float> >::partial") for n in names)


def test_misaligned_access_is_caught_with_its_offset(host):
    # memcheck's "misaligned address": a 4-byte load from a byte offset not a multiple of 4
    x = np.arange(8, dtype=np.float32)
    y = np.zeros(1, np.float32)
    with pytest.raises(host.KernelError, match=r"misaligned_load', block \(0, 0, 0\), thread "
                                                r"\(0, 0, 0\): misaligned 4-byte read of "
                                                r"argument 0 .*at byte offset 2 \(a GPU faults: "
                                                r"misaligned address\)"):
        launch(ST, "misaligned_load", 1, 32, (x, y, np.int32(2)))
    launch(ST, "misaligned_load", 1, 32, (x, y, np.int32(8)))   # aligned: x[2]
    assert y[0] == 2.0
