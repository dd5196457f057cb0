"""The CUDA emulator's semantics, through the kernels of csrc/cuda/selftest.cu.

The correct kernels also run on a real GPU (``where='gpu'``), which checks that the emulator
and the hardware agree; the deliberately wrong ones run in the emulator only.
"""
import time

import numpy as np
import pytest

from gpudiff.runtime import cuda as rc
from gpudiff.runtime.cuda import launch as cuda_launch
from gpudiff.runtime.cuda.launch import launch

ST = "selftest.cu"


def _run_rotate(where, x, with_barrier):
    rows, n = x.shape
    y = where.put(np.zeros_like(x))
    launch(ST, "rotate_block", rows, n, (where.put(x), y, np.int32(with_barrier)))
    return where.get(y)


@pytest.mark.parametrize("n", [32, 100, 256, 1024])
def test_barrier_orders_shared_memory_in_every_thread_order(where, n):
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    np.testing.assert_array_equal(_run_rotate(where, x, True), np.roll(x, -1, axis=1))


def test_missing_barrier_gives_a_wrong_answer_in_some_order():
    rng = np.random.default_rng(0)
    wrong = {}
    for order in ("forward", "reverse", "random"):
        # racecheck off: it would stop the launch (test_sanitizer.py shows that)
        with cuda_launch.emulator(order=order, seed=5, check=""):
            x = rng.standard_normal((2, 64)).astype(np.float32)  # fresh data: no stale match
            y = _rotate_emulated(x, False)
            wrong[order] = int((y != np.roll(x, -1, axis=1)).sum())
    # forward: thread t reads s[t+1] before thread t+1 wrote it; reverse: only the wrap-around
    # element is stale; random: some mixture
    assert wrong["forward"] >= 2 * 62
    assert wrong["reverse"] == 2
    assert wrong["random"] > 0


def _rotate_emulated(x, with_barrier):
    y = np.zeros_like(x)
    launch(ST, "rotate_block", x.shape[0], x.shape[1], (x, y, np.int32(with_barrier)))
    return y


def _warp_ops_reference(x, width):
    """What the CUDA programming guide says each lane gets (x: (n,), n a multiple of 32)."""
    n = x.size
    out = np.zeros((8, n), np.int64)
    for w0 in range(0, n, 32):
        v = x[w0:w0 + 32]
        for lane in range(32):
            seg = lane & ~(width - 1)
            out[0, w0 + lane] = v[seg + (((lane * 7 + 3) & 31) & (width - 1))]
            out[1, w0 + lane] = v[lane] if lane - seg < 3 else v[lane - 3]
            out[2, w0 + lane] = v[lane] if lane - seg + 5 >= width else v[lane + 5]
            j = lane ^ 6
            out[3, w0 + lane] = v[lane] if j > (seg | (width - 1)) else v[j]
            out[4, w0 + lane] = sum(1 << k for k in range(32) if v[k] & 1)
            out[5, w0 + lane] = int((v == 7).any())
            out[6, w0 + lane] = int((v >= 0).all())
            out[7, w0 + lane] = v[lane ^ 1]
    return out.astype(np.uint32).view(np.int32)  # the ballot as the kernel's int


@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_warp_intrinsics_exchange_between_lanes(where, width):
    rng = np.random.default_rng(width)
    x = rng.integers(0, 10, size=128).astype(np.int32)
    out = where.put(np.zeros((8, 128), np.int32))
    launch(ST, "warp_ops", 2, 64, (where.put(x), out, np.int32(width)))
    np.testing.assert_array_equal(where.get(out), _warp_ops_reference(x, width))


def test_shuffle_reduction_and_atomic_add(where):
    x = np.random.default_rng(1).standard_normal(10_000)
    total = where.put(np.zeros(1))
    launch(ST, "atomic_sum", 4, 128, (where.put(x), total, np.int64(x.size)))
    np.testing.assert_allclose(where.get(total)[0], x.sum(), rtol=1e-12)


def test_atomic_add_and_max_on_ints(where):
    x = np.random.default_rng(2).integers(0, 50, size=3000).astype(np.int32)
    hist = where.put(np.zeros(50, np.int32))
    mx = where.put(np.full(1, -1, np.int32))
    launch(ST, "atomic_hist", 3, 96, (where.put(x), hist, mx, np.int64(x.size)))
    np.testing.assert_array_equal(where.get(hist), np.bincount(x, minlength=50))
    assert where.get(mx)[0] == x.max()


def test_dynamic_shared_memory(where):
    x = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    y = where.put(np.zeros_like(x))
    launch(ST, "reverse_dynamic", 5, 96, (where.put(x), y), shared_mem=96 * 4)
    np.testing.assert_array_equal(where.get(y), x[:, ::-1])


def test_syncthreads_count_and_or(where):
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    x[1] = np.abs(x[1]) + 1  # all positive
    x[2] = -np.abs(x[2]) - 1  # none positive
    counts, any_, all_ = (where.put(np.full(3, -1, np.int32)) for _ in range(3))
    launch(ST, "barrier_count", 3, 64, (where.put(x), counts, any_, all_))
    np.testing.assert_array_equal(where.get(counts), (x > 0).sum(1))
    assert [bool(v) for v in where.get(any_)] == [bool((r > 0).any()) for r in x]
    assert [bool(v) for v in where.get(all_)] == [bool((r > 0).all()) for r in x]


def test_3d_grid_and_block_indices(where):
    grid, block = (3, 2, 2), (4, 3, 2)
    nthreads = int(np.prod(grid) * np.prod(block))
    out = where.put(np.full((nthreads, 12), -1, np.int32))
    launch(ST, "index_probe", grid, block, (out,))
    out = where.get(out)
    expect = []
    for bz in range(2):
        for by in range(2):
            for bx in range(3):
                for tz in range(2):
                    for ty in range(3):
                        for tx in range(4):
                            expect.append((tx, ty, tz, bx, by, bz, *block, *grid))
    np.testing.assert_array_equal(out, np.array(expect))


def test_shuffled_block_order_gives_the_same_result():
    x = np.random.default_rng(6).standard_normal((40, 300)).astype(np.float32)
    plain = rc.softmax.softmax(x, 1)
    with cuda_launch.emulator(order="random", shuffle_blocks=True, seed=9):
        shuffled = rc.softmax.softmax(x, 1)
    np.testing.assert_array_equal(plain, shuffled)


# ---- faults the emulator must catch -----------------------------------------------------------
def test_guard_zone_catches_an_out_of_bounds_write_and_names_the_kernel(host):
    y = np.zeros(100, np.float32)
    with pytest.raises(host.KernelError, match=r"kernel 'oob_write' wrote outside argument 0"):
        launch(ST, "oob_write", 1, 32, (y, np.int64(100), np.int64(3)))
    with pytest.raises(host.KernelError, match=r"oob_write.*argument 0"):
        launch(ST, "oob_write", 1, 32, (y, np.int64(100), np.int64(-105)))  # before the start
    launch(ST, "oob_write", 1, 32, (y, np.int64(99), np.int64(0)))  # in bounds: fine
    assert y[99] == 1.0


def test_out_of_bounds_read_is_caught_at_once(host):
    x, y = np.zeros(10, np.float32), np.zeros(1, np.float32)
    with pytest.raises(host.KernelError, match=r"kernel 'oob_read'.*out-of-bounds access to "
                                                r"argument 0: a 4-byte access at byte offset 40 "
                                                r"of a 40-byte array"):
        launch(ST, "oob_read", 1, 1, (x, y, np.int64(10)))


def test_dynamic_shared_overflow_is_caught(host):
    y = np.zeros(64, np.float32)
    with pytest.raises(host.KernelError, match=r"dynamic_overflow.*outside its 256 bytes of "
                                                r"dynamic shared memory"):
        launch(ST, "dynamic_overflow", 1, 64, (y,), shared_mem=64 * 4)


def test_divergent_barrier_is_a_deadlock(host):
    y = np.zeros(64, np.float32)
    with pytest.raises(host.KernelError, match=r"divergent_barrier.*deadlock: 32 threads wait "
                                                r"at __syncthreads\(\), 0 at warp intrinsics, 32 "
                                                r"have exited"):
        launch(ST, "divergent_barrier", 1, 64, (y,))


def test_shuffle_from_a_lane_outside_the_mask_is_an_error(host):
    y = np.zeros(32, np.int32)
    with pytest.raises(host.KernelError, match=r"lane \d+ reads lane 20, which is not in the "
                                                r"mask 0x0000ffff"):
        launch(ST, "shfl_outside_mask", 1, 32, (y,))


def test_full_mask_in_a_partial_warp_is_an_error(host):
    # 48 threads: the second warp has lanes 0-15 only, so 0xffffffff names missing lanes
    out = np.zeros((8, 48), np.int32)
    with pytest.raises(host.KernelError, match=r"warp_ops.*mask 0xffffffff names lanes that do "
                                                r"not exist in this block \(this warp has lanes "
                                                r"0x0000ffff\)"):
        launch(ST, "warp_ops", 1, 48, (np.zeros(48, np.int32), out, np.int32(32)))


def test_emulator_recovers_after_a_fault(host):
    with pytest.raises(host.KernelError):
        launch(ST, "divergent_barrier", 1, 64, (np.zeros(64, np.float32),))
    x = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(_rotate_emulated(x, True), np.roll(x, -1, axis=1))


def test_arguments_are_type_checked(host):
    x, y = np.zeros(8, np.float32), np.zeros(8, np.float32)
    ok = (x, y, np.int64(8))
    launch("activations.cu", "relu_fwd<float>", 1, 32, ok)
    with pytest.raises(host.KernelError, match=r"argument 0 must be gptr<const f4>, got an "
                                                r"array of f8"):
        launch("activations.cu", "relu_fwd<float>", 1, 32, (x.astype(np.float64), y, np.int64(8)))
    with pytest.raises(host.KernelError, match=r"argument 2 must be i8, got a scalar of i4"):
        launch("activations.cu", "relu_fwd<float>", 1, 32, (x, y, np.int32(8)))
    with pytest.raises(TypeError, match=r"typed NumPy scalars"):
        launch("activations.cu", "relu_fwd<float>", 1, 32, (x, y, 8))
    ro = y.copy()
    ro.flags.writeable = False
    with pytest.raises(host.KernelError, match=r"argument 1 must be gptr<f4> \(a writeable array\)"):
        launch("activations.cu", "relu_fwd<float>", 1, 32, (x, ro, np.int64(8)))
    with pytest.raises(host.KernelError, match=r"takes 3 arguments"):
        launch("activations.cu", "relu_fwd<float>", 1, 32, (x, y))
    with pytest.raises(host.KernelError, match=r"at most 1024 threads"):
        launch("activations.cu", "relu_fwd<float>", 1, 2048, ok)
    with pytest.raises(KeyError, match=r"not listed in activations.cu"):
        launch("activations.cu", "softmax_fwd<float>", 1, 32, ok)


def test_aliased_arguments_share_one_buffer():
    # in place: x and y are the same array
    x = np.array([-1.0, 2.0, -3.0, 4.0, 0.5], np.float32)
    launch("activations.cu", "relu_fwd<float>", 1, 32, (x, x, np.int64(5)))
    np.testing.assert_array_equal(x, [0, 2, 0, 4, 0.5])


def test_softmax_backward_64x1000_with_256_thread_blocks_is_fast():
    rng = np.random.default_rng(8)
    y = rc.softmax.softmax(rng.standard_normal((64, 1000)).astype(np.float32), 1)
    gy = rng.standard_normal((64, 1000)).astype(np.float32)
    gx = np.empty_like(y)
    start = time.perf_counter()
    launch("softmax.cu", "softmax_bwd<float>", 64, 256, (y, gy, gx, np.int64(64), np.int32(1000)))
    elapsed = time.perf_counter() - start
    assert cuda_launch.last_emulator_stats["threads"] == 64 * 256
    np.testing.assert_allclose(gx, y * (gy - (gy * y).sum(1, keepdims=True)), atol=1e-6)
    assert elapsed < 0.5, f"took {elapsed:.3f} s"


def test_emulator_settings_from_the_environment_syntax():
    before = cuda_launch.emulator_settings()
    with cuda_launch.emulator():
        cuda_launch._settings_from_env("order=reverse, seed=3,shuffle_blocks=1")
        settings = cuda_launch.emulator_settings()
        assert {k: settings[k] for k in ("order", "seed", "shuffle_blocks")} == {
            "order": "reverse", "seed": 3, "shuffle_blocks": True}
        cuda_launch._settings_from_env("check=race,init")
        assert cuda_launch.emulator_settings()["check"] == ("init", "race")
        cuda_launch._settings_from_env("check=none")
        assert cuda_launch.emulator_settings()["check"] == ()
        with pytest.raises(ValueError, match="unknown setting 'speed'"):
            cuda_launch._settings_from_env("speed=2")
        with pytest.raises(ValueError, match="order must be one of"):
            cuda_launch.set_emulator(order="sideways")
    assert cuda_launch.emulator_settings() == before  # restored
