"""The emulated device's memory (gpudiff/runtime/emulated.py): empty() starts poisoned, and a
pool accounting like CuPy's backs gpudiff.cuda.memory_allocated() and friends, so memory
tests run in CI. Accounting is exact: each live array owning device memory holds its size
rounded up to 512 bytes.
"""
import gc

import numpy as np
import pytest

import gpudiff
import gpudiff.nn as nn
import gpudiff.nn.functional as F
from gpudiff import cuda
from gpudiff.runtime import emulated
from gpudiff.runtime.cuda import launch as cuda_launch
from gpudiff.tensor import Tensor

pytestmark = pytest.mark.skipif(not cuda.is_emulated(), reason="the emulated device's pool")

xp = gpudiff.device("cuda").xp


def allocated():
    gc.collect()  # what is unreachable is free (cycles of the tape included)
    return cuda.memory_allocated()


def blocks(*nbytes):
    return sum(-(-n // 512) * 512 for n in nbytes)


# ---- poison ------------------------------------------------------------------------------
def test_empty_is_poisoned():
    for a in (xp.empty((3, 5), np.float32), xp.empty_like(np.zeros((2, 3), np.float64)),
              xp.empty_like(np.zeros((4, 3), np.float32).T)):
        assert np.isnan(a).all()
        assert set(a.tobytes()) == {0xFF}
    assert (xp.empty(7, np.int32) == -1).all()
    t = gpudiff.zeros(2, 3, device="cuda").new_empty((4,))
    assert t.device.type == "cuda" and np.isnan(t.numpy(force=True)).all()


def test_a_kernel_reading_an_empty_array_it_never_wrote_is_flagged():
    host = pytest.importorskip("gpudiff._cuda_host")
    x = np.ones(1, np.float32)
    with cuda_launch.emulator(check="init"):
        total = xp.zeros(1, np.float32)  # total[0] += x[0]: reads what it adds to
        cuda_launch.launch("selftest.cu", "forgotten_atomic", 1, 1, (x, total, np.int64(1)))
        assert total[0] == 1
        total = xp.empty(1, np.float32)
        with pytest.raises(host.KernelError, match=r"forgotten_atomic.*initcheck: read of "
                                                    r"uninitialised global memory: argument 1"):
            cuda_launch.launch("selftest.cu", "forgotten_atomic", 1, 1, (x, total,
                                                                          np.int64(1)))
    with cuda_launch.emulator(check=""):  # unchecked, the poison makes it NaN
        cuda_launch.launch("selftest.cu", "forgotten_atomic", 1, 1, (x, total, np.int64(1)))
    assert np.isnan(total[0])


# ---- accounting --------------------------------------------------------------------------
def test_allocated_grows_with_live_tensors_and_returns_to_baseline():
    base = allocated()
    a = gpudiff.randn(100, 100, device="cuda")            # 40000 bytes
    assert allocated() == base + blocks(40000)
    b = gpudiff.zeros(3, dtype=gpudiff.int64, device="cuda")  # 24 bytes: one 512-byte block
    c = a.exp()
    d = a[:10]                                              # a view holds no memory
    assert allocated() == base + blocks(40000, 24, 40000)
    del a
    assert allocated() == base + blocks(40000, 24, 40000)  # d keeps a's memory alive
    del b, c, d
    assert allocated() == base
    assert cuda.memory_allocated("cuda:0") == base         # `device` is accepted, ignored


def test_transfers_copy_onto_the_device():
    base = allocated()
    h = np.arange(1000, dtype=np.float32)
    t = gpudiff.from_numpy(h).to("cuda")
    assert allocated() == base + blocks(4000)
    t.add_(1)
    assert h[0] == 0  # a copy, as on a GPU
    back = t.cpu()
    assert allocated() == base + blocks(4000)  # the host copy is not device memory
    del t
    assert allocated() == base and back[0].item() == 1


def test_max_allocated_tracks_the_peak_of_forward_and_backward():
    w = gpudiff.randn(256, 256, device="cuda", requires_grad=True)
    x = gpudiff.randn(64, 256, device="cuda")
    base = allocated()
    cuda.reset_peak_memory_stats()
    assert cuda.max_memory_allocated() == base
    h = (x @ w).relu()        # x @ w and h: two (64, 256) activations at once; h is saved
    y = (h @ w).sum()
    during = allocated()
    assert during >= base + blocks(64 * 256 * 4)
    y.backward()
    assert w.grad is not None
    del h, y
    after = allocated()
    peak = cuda.max_memory_allocated()
    assert peak >= during and peak >= after and peak >= base + blocks(64 * 256 * 4) * 2
    cuda.reset_peak_memory_stats()
    assert cuda.max_memory_allocated() == after


def test_reserved_keeps_freed_blocks_until_empty_cache():
    base_used = allocated()
    a = xp.ones((512, 512), np.float32)  # 1 MiB
    assert cuda.memory_reserved() >= cuda.memory_allocated() == base_used + 2 ** 20
    del a
    assert allocated() == base_used
    reserved = cuda.memory_reserved()
    assert reserved >= base_used + 2 ** 20  # the block stays in the pool
    b = xp.zeros((512, 512), np.float32)   # reuses it: nothing new reserved
    assert cuda.memory_reserved() == reserved
    del b
    cuda.empty_cache()
    assert cuda.memory_reserved() == allocated()
    assert cuda.memory_reserved() < reserved


def test_functions_of_xp_are_device_memory():
    base = allocated()
    a = xp.full((10, 10), 2.0, np.float32)
    s = xp.sum(a)                  # CuPy returns 0-d arrays; so does the emulated xp
    assert type(s) is np.ndarray and s.shape == () and s == 200
    m = xp.maximum.reduce(a, axis=0)
    assert allocated() == base + blocks(400, 4, 40)
    del a, s, m
    assert allocated() == base


def _small_cnn():  # every kind of kernel a CNN step launches, at a size the emulator runs fast
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


# the loops test the accounting; racecheck and initcheck of these kernels are tested elsewhere
unchecked = pytest.mark.usefixtures("kernels_unchecked")


@pytest.fixture
def kernels_unchecked():
    with cuda_launch.emulator(check=""):
        yield


@unchecked
def test_training_does_not_leak():
    model = _small_cnn().to("cuda")
    opt = gpudiff.optim.Adam(model.parameters(), lr=1e-3)
    X, Y = gpudiff.randn(4, 1, 8, 8), gpudiff.randint(0, 10, (4,))
    base = allocated()
    seen = {}
    for step in range(1, 201):
        x, y = X.to("cuda"), Y.to("cuda")
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        del x, y, loss
        if step in (20, 200):
            seen[step] = allocated()
    params = sum(p.numel() * 4 for p in model.parameters())
    # Adam's two moments stay, beside the parameters (allocated before `base`)
    assert seen[20] >= base + 2 * params
    assert seen[200] == seen[20]
    assert cuda.memory_reserved() >= seen[200]


@unchecked
def test_training_accounts_activations_gradients_and_optimizer_state():
    model = _small_cnn().to("cuda")
    params = [p for p in model.parameters()]
    opt = gpudiff.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = gpudiff.randn(4, 1, 8, 8, device="cuda"), gpudiff.randint(0, 10, (4,), device="cuda")
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    del loss
    gc.collect()
    # every array of a live cuda tensor is a block of the pool: parameters, inputs,
    # gradients, momentum buffers
    live = [t for t in gc.get_objects() if isinstance(t, Tensor) and t.device.type == "cuda"]
    missing = []
    for t in live:
        root = t.array
        while isinstance(root.base, np.ndarray):
            root = root.base
        if not emulated.pool.holds(root):
            missing.append(tuple(t.shape))
    assert missing == []


def test_op_outputs_are_arrays_and_device_blocks():
    t = gpudiff.tensor(3, device="cuda") ** 2          # NumPy: int 0-d ** 2 is a scalar
    assert type(t.array) is np.ndarray
    y = gpudiff.randn(4, 5, device="cuda").to(gpudiff.float64)  # astype: a method
    assert emulated.pool.holds(y.array)
