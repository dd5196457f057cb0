"""gpudiff.utils.data: datasets, samplers, collate and the DataLoader (PyTorch as oracle)."""
import collections
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import gpudiff
from gpudiff.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
    get_worker_info,
    random_split,
)


def _to_py(x):
    """gpudiff/torch batches -> (dtype name, nested lists) for comparison."""
    if gpudiff.is_tensor(x):
        return ("tensor", str(x.dtype), x.shape, x.tolist())
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype).replace("torch.", ""), tuple(x.shape), x.tolist())
    if isinstance(x, dict):
        return {k: _to_py(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return (type(x).__name__,) + tuple(_to_py(v) for v in x)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_to_py(v) for v in x])
    return x


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("samples", [
    [1, 2, 3],
    [1.5, 2.0],
    [True, False],
    [True, 2],
    [np.float32(1.5), np.float32(2)],
    [np.int32(3), np.int32(4)],
    [np.array([1, 2], np.uint8), np.array([3, 4], np.uint8)],
    [np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)],
    [np.array(1.5), np.array(2.5)],
    ["a", "b"],
    [(np.zeros(2, np.float32), 1, "x"), (np.ones(2, np.float32), 0, "y")],
    [[1, 2.0], [3, 4.0]],
    [{"img": np.zeros(2), "label": 1, "meta": {"id": 7}},
     {"img": np.ones(2), "label": 0, "meta": {"id": 8}}],
    [Point(1, 2.0), Point(3, 4.0)],
])
def test_default_collate_matches_pytorch(samples):
    ours = default_collate(samples)
    theirs = tud.default_collate(samples)
    assert _to_py(ours) == _to_py(theirs)


def test_default_collate_stacks_gpudiff_tensors_and_errors_like_pytorch():
    b = default_collate([gpudiff.tensor([1.0, 2.0]), gpudiff.tensor([3.0, 4.0])])
    assert gpudiff.is_tensor(b) and b.dtype == gpudiff.float32 and b.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(RuntimeError, match="equal size"):
        default_collate([gpudiff.tensor([1.0]), gpudiff.tensor([1.0, 2.0])])
    with pytest.raises(RuntimeError, match="each element in list of batch should be of equal"):
        default_collate([[1, 2], [3]])
    with pytest.raises(TypeError, match="found <class 'object'>"):
        default_collate([object(), object()])
    with pytest.raises(TypeError, match="default_collate: batch must contain"):
        default_collate([np.array(["a"]), np.array(["b"])])


def test_tensor_dataset_subset_concat():
    x = gpudiff.tensor(np.arange(12, dtype=np.float32).reshape(6, 2))
    y = np.arange(6)
    ds = TensorDataset(x, y)
    assert len(ds) == 6
    xi, yi = ds[4]
    assert xi.tolist() == [8.0, 9.0] and yi == 4
    with pytest.raises(ValueError, match="Size mismatch"):
        TensorDataset(x, np.arange(5))
    sub = Subset(ds, [5, 0])
    assert len(sub) == 2 and sub[0][1] == 5 and sub[1][1] == 0
    cat = ds + sub
    assert isinstance(cat, ConcatDataset) and len(cat) == 8
    assert cat[6][1] == 5 and cat[-1][1] == 0 and cat[2][1] == 2
    with pytest.raises(IndexError):
        cat[8]


def test_dataloader_batches_in_order():
    ds = TensorDataset(np.arange(10, dtype=np.float32)[:, None], np.arange(10))
    dl = DataLoader(ds, batch_size=4)
    batches = list(dl)
    assert len(dl) == 3 and len(batches) == 3
    x, y = batches[0]
    assert gpudiff.is_tensor(x) and x.shape == (4, 1) and x.dtype == gpudiff.float32
    assert gpudiff.is_tensor(y) and y.dtype == gpudiff.int64
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dl = DataLoader(ds, batch_size=4, drop_last=True)
    assert len(dl) == 2 and [b[1].tolist() for b in dl] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # batch_size=None: no batching, samples converted one by one
    items = list(DataLoader(ds, batch_size=None))
    assert len(items) == 10 and items[3][1] == 3 and gpudiff.is_tensor(items[3][0])
    # sampler and batch_sampler
    assert [b[1].tolist() for b in DataLoader(ds, sampler=[9, 1, 5], batch_size=2)] == \
        [[9, 1], [5]]
    assert [b[1].tolist() for b in DataLoader(ds, batch_sampler=[[3, 2], [7]])] == [[3, 2], [7]]
    # custom collate_fn
    assert list(DataLoader(range(5), batch_size=2, collate_fn=sum)) == [1, 5, 4]


def test_tensor_dataset_fast_path_equals_per_sample_collate():
    rng = np.random.default_rng(0)
    x = gpudiff.tensor(rng.random((20, 2, 3), dtype=np.float32))
    y = rng.integers(0, 10, size=20)
    flags = gpudiff.tensor(rng.random(20) > 0.5)
    ds = TensorDataset(x, y, flags)
    fast = list(DataLoader(ds, batch_size=6, shuffle=True, generator=3))
    slow = list(DataLoader(ds, batch_size=6, shuffle=True, generator=3,
                           collate_fn=lambda b: default_collate(b)))
    assert len(fast) == len(slow) == 4
    for f, s_ in zip(fast, slow):
        assert isinstance(f, list) and isinstance(s_, list)      # PyTorch gives lists too
        for a, b in zip(f, s_):
            assert gpudiff.is_tensor(a) and a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_dataloader_argument_errors_like_pytorch():
    ds = TensorDataset(np.arange(4))
    cases = [{"num_workers": -1}, {"timeout": -1}, {"prefetch_factor": 2},
             {"persistent_workers": True}, {"sampler": [0, 1], "shuffle": True},
             {"batch_sampler": [[0]], "batch_size": 2},
             {"batch_sampler": [[0]], "drop_last": True},
             {"batch_size": None, "drop_last": True}, {"batch_size": 0}]
    for kw in cases:
        with pytest.raises(ValueError):
            tud.DataLoader(ds, **kw)              # PyTorch refuses them ...
        with pytest.raises(ValueError):
            DataLoader(ds, **kw)                  # ... and so do we


def _labels(dl):
    return [y.tolist() for _, y in dl]


def test_shuffle_is_a_reproducible_permutation():
    ds = TensorDataset(np.zeros((50, 1), np.float32), np.arange(50))
    dl = DataLoader(ds, batch_size=8, shuffle=True, generator=gpudiff.Generator().manual_seed(3))
    e1, e2 = _labels(dl), _labels(dl)
    for epoch in (e1, e2):
        flat = [i for batch in epoch for i in batch]
        assert sorted(flat) == list(range(50)) and flat != list(range(50))
    assert e1 != e2                                         # each epoch reshuffles
    dl2 = DataLoader(ds, batch_size=8, shuffle=True,
                     generator=gpudiff.Generator().manual_seed(3))
    assert _labels(dl2) == e1 and _labels(dl2) == e2       # same seed, same epochs
    # an int seed, a numpy Generator and a torch.Generator are accepted too
    assert _labels(DataLoader(ds, batch_size=8, shuffle=True, generator=5)) == \
        _labels(DataLoader(ds, batch_size=8, shuffle=True, generator=5))
    (one,) = _labels(DataLoader(ds, shuffle=True, batch_size=50,
                                generator=np.random.default_rng(0)))
    assert sorted(one) == list(range(50))
    g = torch.Generator().manual_seed(1)
    a = _labels(DataLoader(ds, batch_size=50, shuffle=True, generator=g))
    g.manual_seed(1)
    assert _labels(DataLoader(ds, batch_size=50, shuffle=True, generator=g)) == a


def test_shuffle_follows_manual_seed_without_generator():
    ds = TensorDataset(np.arange(30))
    dl = DataLoader(ds, batch_size=30, shuffle=True)
    gpudiff.manual_seed(0)
    a = [b[0].tolist() for b in dl] + [b[0].tolist() for b in dl]
    gpudiff.manual_seed(0)
    b = [b[0].tolist() for b in dl] + [b[0].tolist() for b in dl]
    assert a == b and a[0] != a[1]


def test_random_split_matches_pytorch_sizes_and_is_reproducible():
    for n, lengths in [(11, [0.3, 0.3, 0.4]), (10, [0.5, 0.5]), (7, [0.1, 0.9]), (10, [3, 7])]:
        ours = random_split(range(n), lengths, generator=gpudiff.Generator().manual_seed(0))
        theirs = tud.random_split(range(n), lengths, generator=torch.Generator().manual_seed(0))
        assert [len(s) for s in ours] == [len(s) for s in theirs]
        flat = [i for s in ours for i in s]
        assert sorted(flat) == list(range(n))
    a = random_split(range(20), [0.5, 0.5], generator=7)
    b = random_split(range(20), [0.5, 0.5], generator=7)
    assert [list(s) for s in a] == [list(s) for s in b]
    gpudiff.manual_seed(4)
    c = [list(s) for s in random_split(range(20), [10, 10])]
    gpudiff.manual_seed(4)
    assert c == [list(s) for s in random_split(range(20), [10, 10])]
    with pytest.raises(ValueError, match="Sum of input lengths"):
        random_split(range(10), [3, 3])
    with pytest.raises(ValueError):
        tud.random_split(range(10), [3, 3])


def test_samplers():
    assert list(SequentialSampler(range(4))) == [0, 1, 2, 3]
    rs = RandomSampler(range(10), generator=0)
    assert sorted(rs) == list(range(10)) and len(rs) == 10
    rs = RandomSampler(range(4), num_samples=10, generator=0)
    out = list(rs)
    assert len(out) == 10 and sorted(out[:4]) == [0, 1, 2, 3] and sorted(out[4:8]) == [0, 1, 2, 3]
    rep = list(RandomSampler(range(3), replacement=True, num_samples=100, generator=0))
    assert len(rep) == 100 and set(rep) == {0, 1, 2}
    with pytest.raises(ValueError, match="num_samples should be a positive integer"):
        RandomSampler(range(3), num_samples=0)
    assert sorted(SubsetRandomSampler([5, 7, 9], generator=1)) == [5, 7, 9]
    w = list(WeightedRandomSampler([0.0, 1.0, 0.0, 3.0], 400, generator=0))
    assert set(w) == {1, 3} and 0.65 < w.count(3) / 400 < 0.85
    assert list(BatchSampler(range(5), 2, drop_last=True)) == [[0, 1], [2, 3]]
    assert len(BatchSampler(range(5), 2, drop_last=False)) == 3
    with pytest.raises(ValueError):
        BatchSampler(range(5), 0, drop_last=False)


# ---- worker processes ----------------------------------------------------------------
class _Slow(Dataset):
    """Each item takes 50 ms and records which process loaded it."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        time.sleep(0.05)
        return {"i": i, "pid": os.getpid(), "x": np.full(3, i, np.float32)}


def test_workers_load_in_parallel_and_keep_order():
    ds = _Slow()
    t0 = time.perf_counter()
    batches = list(DataLoader(ds, batch_size=2, num_workers=4))
    parallel = time.perf_counter() - t0
    assert [b["i"].tolist() for b in batches] == [[2 * k, 2 * k + 1] for k in range(12)]
    assert batches[5]["x"].tolist() == [[10.0] * 3, [11.0] * 3]
    pids = {p for b in batches for p in b["pid"].tolist()}
    assert len(pids) == 4 and os.getpid() not in pids          # four real worker processes
    # 24 x 50 ms = 1.2 s of sleep in one process; four processes overlap it
    assert parallel < 0.9, parallel
    assert multiprocessing.active_children() == []            # all workers shut down


def test_workers_give_the_same_batches_as_single_process():
    ds = TensorDataset(np.arange(40, dtype=np.float32)[:, None], np.arange(40))
    for shuffle in (False, True):
        ref = DataLoader(ds, batch_size=6, shuffle=shuffle, generator=11)
        par = DataLoader(ds, batch_size=6, shuffle=shuffle, generator=11, num_workers=3)
        for _ in range(2):                                    # two epochs each
            assert _labels(par) == _labels(ref)


class _FailsAt(Dataset):
    def __init__(self, bad):
        self.bad = bad

    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError(f"cannot decode sample {i}")
        return i


def test_worker_error_is_reraised_with_its_traceback():
    dl = DataLoader(_FailsAt(5), batch_size=2, num_workers=2)
    it = iter(dl)
    assert next(it).tolist() == [0, 1] and next(it).tolist() == [2, 3]
    with pytest.raises(ValueError) as e:
        next(it)
    msg = str(e.value)
    assert "Caught ValueError in DataLoader worker process" in msg
    assert "cannot decode sample 5" in msg and "__getitem__" in msg and "Traceback" in msg
    # the epoch can go on, as in PyTorch; its end shuts the workers down
    assert [b.tolist() for b in it] == [[6, 7], [8, 9]]
    assert multiprocessing.active_children() == []


class _NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)


class _RaisesOdd(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise _NeedsTwoArgs("x", "y")


def test_worker_error_of_odd_exception_type_becomes_runtime_error():
    with pytest.raises(RuntimeError, match="Caught _NeedsTwoArgs"):
        list(DataLoader(_RaisesOdd(), num_workers=1))


class _Dies(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 3:
            os._exit(7)
        return i


def test_dead_worker_raises_instead_of_hanging():
    with pytest.raises(RuntimeError, match=r"exited unexpectedly.*exit code 7"):
        list(DataLoader(_Dies(), num_workers=2))
    time.sleep(0.1)
    assert multiprocessing.active_children() == []


def test_breaking_out_early_shuts_workers_down():
    dl = DataLoader(_Slow(), batch_size=2, num_workers=3)
    for b in dl:
        break
    del b
    import gc
    gc.collect()
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


def test_timeout():
    with pytest.raises(RuntimeError, match="timed out"):
        list(DataLoader(_Slow(), batch_size=24, num_workers=1, timeout=0.3))


class _RandomItems(Dataset):
    """Items drawn from gpudiff's global RNG (as a random transform would)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        info = get_worker_info()
        return {"r": float(gpudiff.rand(1).item()), "np": float(np.random.random()),
                "wid": -1 if info is None else info.id}


def test_workers_are_seeded_apart_and_reproducibly():
    dl = DataLoader(_RandomItems(), batch_size=1, num_workers=4)
    gpudiff.manual_seed(0)
    a = list(dl)
    gpudiff.manual_seed(0)
    b = list(dl)
    ra = [x["r"].item() for x in a]
    assert ra == [x["r"].item() for x in b]                      # reproducible
    assert len(set(ra)) == 8                                     # no two workers alike
    assert len({x["np"].item() for x in a}) == 8                 # numpy reseeded too
    assert sorted({x["wid"].item() for x in a}) == [0, 1, 2, 3]
    assert get_worker_info() is None


class _Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, self.n, step))


def test_iterable_dataset_with_and_without_workers():
    assert [b.tolist() for b in DataLoader(_Stream(7), batch_size=3)] == [[0, 1, 2], [3, 4, 5],
                                                                          [6]]
    got = [b.tolist() for b in DataLoader(_Stream(10), batch_size=2, num_workers=2)]
    assert sorted(i for b in got for i in b) == list(range(10))
    assert got[0] == [0, 2] and got[1] == [1, 3]            # round-robin over workers
    # workers that run dry at different times (shards of 4, 3 and 3 items), many tasks in
    # flight: every item exactly once, each worker's batches in its own order
    for prefetch in (1, 4):
        got = [b.tolist() for b in DataLoader(_Stream(10), batch_size=2, num_workers=3,
                                              prefetch_factor=prefetch)]
        assert sorted(i for b in got for i in b) == list(range(10))
        assert got[:3] == [[0, 3], [1, 4], [2, 5]]
        assert sorted(got[3:]) == [[6, 9], [7], [8]]
    with pytest.raises(ValueError, match="shuffle"):
        DataLoader(_Stream(3), shuffle=True)


class _Pids(Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {"i": i, "pid": os.getpid()}


def test_persistent_workers_and_worker_init_fn():
    calls = multiprocessing.get_context("fork").Value("i", 0)

    def init(wid):
        with calls.get_lock():
            calls.value += 1
    ds = _Pids()
    dl = DataLoader(ds, batch_size=6, num_workers=2, persistent_workers=True,
                    worker_init_fn=init)
    p1 = {p for b in dl for p in b["pid"].tolist()}
    p2 = {p for b in dl for p in b["pid"].tolist()}
    assert p1 == p2 and len(p1) == 2 and calls.value == 2      # same two processes, once each
    assert [b["i"].tolist()[0] for b in dl] == [0, 6, 12, 18]
    dl._pool.shutdown()
    assert multiprocessing.active_children() == []


@pytest.mark.skipif(not gpudiff.cuda.is_available(), reason="needs a (real or emulated) cuda "
                    "device: run with GPUDIFF_CUDA=emulate")
def test_collate_keeps_the_device_of_tensors():
    x = gpudiff.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), device="cuda")
    b = default_collate([x, x + 1])
    assert b.device.type == "cuda" and b.shape == (2, 2, 3)
    np.testing.assert_array_equal(b.cpu().numpy()[1], np.arange(6).reshape(2, 3) + 1)


class _UsesKernels(Dataset):
    """Items computed with gpudiff's compiled (OpenMP) CPU kernels inside the worker."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        import gpudiff.nn.functional as F
        # big enough for the kernels to go parallel (im2col: 8*27*32*32 elements)
        x = gpudiff.tensor(np.full((8, 3, 32, 32), float(i), np.float32))
        y = F.conv2d(x, gpudiff.ones(8, 3, 3, 3), padding=1)
        s = F.softmax(gpudiff.tensor(np.zeros((256, 1000), np.float32)), dim=1)
        return float(y.sum().item()), float(s.sum().item())


def test_workers_can_run_parallel_kernels_after_the_parent_did():
    """gcc's OpenMP pool does not survive fork: workers must not wait for the parent's pool
    threads (they run kernels single-threaded, as PyTorch's workers do)."""
    import gpudiff.nn.functional as F
    for _ in range(2):                                       # the parent's pool is now warm
        F.conv2d(gpudiff.randn(16, 3, 32, 32), gpudiff.randn(8, 3, 3, 3), padding=1)
        F.softmax(gpudiff.randn(256, 1000), dim=1)
    out = list(DataLoader(_UsesKernels(), batch_size=2, num_workers=2, timeout=60))
    conv = [v for b in out for v in b[0].tolist()]
    # each output pixel sums a 3x3x3 window of the constant i (zero padding at the border)
    # (interior pixels see 27 values, edge pixels 18, corners 12; x 8 images x 8 channels)
    per_item = 8 * 8 * (30 * 30 * 27 + 4 * 30 * 18 + 4 * 12)
    np.testing.assert_allclose(conv, [i * per_item for i in range(6)], rtol=1e-5)
    np.testing.assert_allclose([v for b in out for v in b[1].tolist()], [256.0] * 6, rtol=1e-5)


def test_worker_batches_carry_numpy_builtin_dtypes():
    """Arrays that cross a pipe come back with equal-but-distinct dtype objects; batches must
    carry numpy's own (the compiled kernels check float32/float64 by identity)."""
    import gpudiff.nn.functional as F
    ds = TensorDataset(np.ones((8, 1, 6, 6), np.float32), np.arange(8))
    x, y = next(iter(DataLoader(ds, batch_size=4, num_workers=1)))
    assert x.array.dtype is np.dtype("float32") and y.array.dtype is np.dtype("int64")
    out = F.conv2d(x, gpudiff.ones(2, 1, 3, 3))              # the compiled im2col path
    np.testing.assert_allclose(out.numpy(), np.full((4, 2, 4, 4), 9.0))
