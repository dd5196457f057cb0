"""gpudiff.datasets: Digits (shipped), MNIST/FashionMNIST (IDX), CIFAR10 (python batches,
restricted unpickling), and the transforms."""
import gzip
import hashlib
import os
import pickle
import struct
import warnings

import numpy as np
import pytest

import gpudiff
from gpudiff.datasets import CIFAR10, MNIST, Digits, FashionMNIST
from gpudiff.datasets import transforms as T
from gpudiff.datasets.cifar import load_batch
from gpudiff.datasets.mnist import read_idx
from gpudiff.utils.data import DataLoader


# ---- Digits ------------------------------------------------------------------------------
def test_digits_splits_items_and_contents():
    train, test = Digits(), Digits(train=False)
    assert len(train) == 1437 and len(test) == 360
    x, y = train[0]
    assert gpudiff.is_tensor(x) and x.shape == (1, 8, 8) and x.dtype == gpudiff.float32
    assert isinstance(y, int) and y == 0
    assert train.data.shape == (1437, 8, 8) and train.data.dtype == np.uint8
    assert train.targets.dtype == np.int64 and test.targets.shape == (360,)
    np.testing.assert_array_equal(x.numpy()[0], train.data[0] / 16.0)
    allx = np.concatenate([train.data, test.data])
    assert allx.min() == 0 and allx.max() == 16
    ally = np.concatenate([train.targets, test.targets])
    # the class counts of the 1,797 UCI test digits (optdigits.tes)
    assert np.bincount(ally).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    digest = hashlib.sha256(allx.tobytes() + ally.astype(np.uint8).tobytes()).hexdigest()
    assert digest == "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
    x, y = test[-1]
    assert y == int(test.targets[-1]) and float(x.numpy().max()) <= 1.0
    with pytest.raises(IndexError):
        test[360]


def test_digits_equal_scikit_learn_copy():
    sklearn = pytest.importorskip("sklearn.datasets")
    b = sklearn.load_digits()
    train, test = Digits(), Digits(train=False)
    np.testing.assert_array_equal(train.data, b.images[:1437])
    np.testing.assert_array_equal(test.data, b.images[1437:])
    np.testing.assert_array_equal(np.concatenate([train.targets, test.targets]), b.target)


def test_digits_in_a_dataloader_with_transforms():
    tf = T.Compose([T.RandomCrop(8, padding=1), T.Normalize((0.5,), (0.25,))])
    dl = DataLoader(Digits(train=False, transform=tf), batch_size=100, num_workers=2)
    batches = list(dl)
    assert [b[0].shape for b in batches] == [(100, 1, 8, 8)] * 3 + [(60, 1, 8, 8)]
    assert batches[0][1].dtype == gpudiff.int64
    assert batches[0][1].tolist() == Digits(train=False).targets[:100].tolist()
    lo = min(float(b[0].numpy().min()) for b in batches)
    assert lo == pytest.approx(-2.0)                    # (0 - 0.5) / 0.25


# ---- MNIST / FashionMNIST ----------------------------------------------------------------
def _idx_bytes(arr, code=0x08):
    dims = struct.pack(f">{arr.ndim}I", *arr.shape)
    dt = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}[code]
    return bytes([0, 0, code, arr.ndim]) + dims + arr.astype(dt).tobytes()


def _write(path, data, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if gz:
        data = gzip.compress(data)
        path = path + ".gz"
    with open(path, "wb") as f:
        f.write(data)
    return path


def _mnist_files(folder, n_train=5, n_test=3, gz_train=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, gz in (("train", n_train, gz_train), ("t10k", n_test, False)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write(os.path.join(folder, f"{split}-images-idx3-ubyte"), _idx_bytes(imgs), gz)
        _write(os.path.join(folder, f"{split}-labels-idx1-ubyte"), _idx_bytes(labels), gz)
        out[split] = (imgs, labels)
    return out


@pytest.mark.parametrize("cls, layout", [(MNIST, "MNIST/raw"), (MNIST, ""),
                                         (FashionMNIST, "FashionMNIST/raw"),
                                         (FashionMNIST, "FashionMNIST")])
def test_mnist_reads_idx_files(tmp_path, cls, layout):
    ref = _mnist_files(os.path.join(tmp_path, layout))
    train, test = cls(tmp_path), cls(str(tmp_path), train=False)
    assert len(train) == 5 and len(test) == 3
    np.testing.assert_array_equal(train.data, ref["train"][0])
    np.testing.assert_array_equal(test.targets, ref["t10k"][1])
    x, y = train[2]
    assert x.shape == (1, 28, 28) and x.dtype == gpudiff.float32
    np.testing.assert_allclose(x.numpy()[0], ref["train"][0][2] / 255.0, rtol=1e-6)
    assert y == int(ref["train"][1][2]) and isinstance(y, int)
    assert 0.0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 1.0
    assert len(cls.classes) == 10


def test_mnist_transform_and_target_transform(tmp_path):
    _mnist_files(tmp_path / "MNIST" / "raw")
    ds = MNIST(tmp_path, transform=T.Normalize((0.1307,), (0.3081,)),
               target_transform=lambda t: t + 100)
    x, y = ds[0]
    expect = (ds.data[0] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(x.numpy()[0], expect, rtol=1e-5, atol=1e-6)
    assert y == int(ds.targets[0]) + 100


def test_mnist_missing_files_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*does not download"):
        MNIST(tmp_path)
    _mnist_files(tmp_path / "MNIST" / "raw")
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        MNIST(tmp_path, train=False)


def test_idx_errors_are_clear(tmp_path):
    imgs = np.zeros((4, 28, 28), np.uint8)
    good = _idx_bytes(imgs)
    p = str(tmp_path / "f-idx3-ubyte")
    cases = [
        (b"\x08\x03" + good[2:], "bad magic"),
        (good[:2] + b"\x07" + good[3:], "bad magic"),
        (good[:3], "truncated"),
        (good[:10], "truncated"),
        (good[:-1], r"truncated IDX file: dimensions \(4, 28, 28\) need 3136"),
        (good + b"xx", "2 bytes after"),
        (_idx_bytes(np.zeros(4, np.uint8)), "expected an IDX file with 3 dimensions, found 1"),
    ]
    for data, msg in cases:
        _write(p, data)
        with pytest.raises(ValueError, match=msg) as e:
            read_idx(p, ndim=3)
        assert p in str(e.value)
    _write(p, gzip.compress(good)[:-10])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        read_idx(p, ndim=3)
    # other IDX types decode with their big-endian dtypes
    _write(p, _idx_bytes(np.array([[-3, 70000]], np.int32), 0x0C))
    np.testing.assert_array_equal(read_idx(p), [[-3, 70000]])
    _write(p, _idx_bytes(np.array([1.5, -2.25], np.float32), 0x0D))
    np.testing.assert_array_equal(read_idx(p), [1.5, -2.25])


def test_mnist_inconsistent_files(tmp_path):
    raw = str(tmp_path / "MNIST" / "raw")
    _write(os.path.join(raw, "train-images-idx3-ubyte"), _idx_bytes(np.zeros((3, 28, 28))))
    _write(os.path.join(raw, "train-labels-idx1-ubyte"), _idx_bytes(np.zeros(4)))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        MNIST(tmp_path)
    _write(os.path.join(raw, "train-labels-idx1-ubyte"), _idx_bytes(np.array([1, 2, 12])))
    with pytest.raises(ValueError, match=r"labels must be in 0..9"):
        MNIST(tmp_path)


# ---- CIFAR-10 ------------------------------------------------------------------------------
def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {"batch_label": f"batch {seed}",
            "labels": rng.integers(0, 10, size=n).tolist(),
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "filenames": [f"img_{seed}_{i}.png" for i in range(n)]}


def _write_cifar(folder, protocol=2):
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(2 if name != "test_batch" else 3, k)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_python_batches(tmp_path, protocol):
    ref = _write_cifar(tmp_path / "cifar-10-batches-py", protocol)
    train, test = CIFAR10(tmp_path), CIFAR10(tmp_path, train=False)
    assert len(train) == 10 and len(test) == 3
    assert train.data.shape == (10, 32, 32, 3) and train.data.dtype == np.uint8
    assert train.targets.tolist() == [y for i in range(1, 6)
                                      for y in ref[f"data_batch_{i}"]["labels"]]
    x, y = train[3]                                 # second image of data_batch_2
    chw = ref["data_batch_2"]["data"][1].reshape(3, 32, 32)
    assert x.shape == (3, 32, 32) and x.dtype == gpudiff.float32
    np.testing.assert_allclose(x.numpy(), chw / 255.0, rtol=1e-6)
    assert y == ref["data_batch_2"]["labels"][1]
    np.testing.assert_array_equal(train.data[3], chw.transpose(1, 2, 0))


def _py2_cifar_pickle(data, labels):
    """A batch exactly as Python 2's cPickle wrote CIFAR-10: protocol 2, byte strings
    (SHORT_BINSTRING/BINSTRING), numpy.core.multiarray._reconstruct."""
    def sbs(s):
        return b"U" + bytes([len(s)]) + s

    def j(i):
        return b"J" + struct.pack("<i", i)
    n = data.shape[0]
    out = b"\x80\x02}(" + sbs(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + sbs(b"b")
    out += b"\x87R(K\x01" + j(n) + j(3072) + b"\x86"
    out += b"cnumpy\ndtype\n" + sbs(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + sbs(b"|") + b"NNN" + j(-1) + j(-1) + b"K\x00tb"
    raw = data.tobytes()
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += sbs(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += sbs(b"batch_label") + sbs(b"training batch 1 of 5")
    return out + b"u."


def test_cifar10_reads_python2_pickles(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=(4, 3072), dtype=np.uint8)
    blob = _py2_cifar_pickle(data, [3, 1, 4, 1])
    with warnings.catch_warnings():              # numpy.core is a deprecated alias in numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        std = pickle.loads(blob, encoding="latin1")   # the standard loader agrees on the format
    np.testing.assert_array_equal(std["data"], data)
    p = tmp_path / "data_batch_1"
    p.write_bytes(blob)
    b = load_batch(str(p))
    np.testing.assert_array_equal(b["data"], data)
    assert b["labels"] == [3, 1, 4, 1] and b["batch_label"] == "training batch 1 of 5"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar10_refuses_code_in_pickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    batch = _cifar_batch(2, 0)
    batch["filenames"] = _Evil()
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3.*refusing to load posix.system"):
        CIFAR10(tmp_path)
    assert not (tmp_path / "PWNED").exists()
    # an object array (whose items pickle would rebuild through arbitrary callables)
    batch = _cifar_batch(2, 0)
    batch["data"] = np.array([{"a": 1}, None], dtype=object)
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFAR10(tmp_path)


def test_cifar10_corrupt_and_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(FileNotFoundError, match="data_batch_1.*does not download"):
        CIFAR10(tmp_path)
    _write_cifar(folder)
    os.remove(folder / "data_batch_4")
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        CIFAR10(tmp_path)
    _write_cifar(folder)
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="data_batch_2.*(corrupt|truncated)"):
        CIFAR10(tmp_path)
    _write_cifar(folder)
    bad = _cifar_batch(2, 0)
    bad["data"] = bad["data"][:, :100]
    (folder / "data_batch_5").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_5.*shape \(N, 3072\)"):
        CIFAR10(tmp_path)
    bad = _cifar_batch(2, 0)
    bad["labels"] = [1]
    (folder / "data_batch_5").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match="one label per image"):
        CIFAR10(tmp_path)
    (folder / "data_batch_5").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="data_batch_5"):
        CIFAR10(tmp_path)


# ---- transforms ----------------------------------------------------------------------------
def test_normalize_matches_formula_and_keeps_kind():
    rng = np.random.default_rng(0)
    a = rng.random((3, 4, 5), dtype=np.float32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    expect = (a - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None,
                                                                                         None]
    out = T.Normalize(mean, std)(a)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    t = T.Normalize(mean, std)(gpudiff.tensor(a))
    assert gpudiff.is_tensor(t) and t.dtype == gpudiff.float32
    np.testing.assert_allclose(t.numpy(), expect, rtol=1e-6)
    batch = T.Normalize(mean, std)(np.stack([a, a]))           # [N, C, H, W]
    np.testing.assert_allclose(batch[1], expect, rtol=1e-6)
    with pytest.raises(ValueError, match="std evaluated to zero"):
        T.Normalize((0.0,), (0.0,))(a)
    with pytest.raises(TypeError, match="float tensor"):
        T.Normalize((0.0,), (1.0,))(np.zeros((1, 2, 2), np.uint8))


def test_random_crop_with_padding_covers_every_offset_reproducibly():
    img = np.arange(1 * 8 * 8, dtype=np.float32).reshape(1, 8, 8) + 1
    padded = np.pad(img, ((0, 0), (2, 2), (2, 2)))
    crop = T.RandomCrop(8, padding=2)
    gpudiff.manual_seed(0)
    seen = set()
    outs = []
    for _ in range(400):
        out = crop(img)
        assert out.shape == (1, 8, 8)
        # the crop is a window of the zero-padded image: find which one
        hits = [(i, j) for i in range(5) for j in range(5)
                if np.array_equal(out, padded[:, i:i + 8, j:j + 8])]
        assert len(hits) == 1
        seen.add(hits[0])
        outs.append(out)
    assert len(seen) == 25                                  # all 5 x 5 offsets occur
    gpudiff.manual_seed(0)
    assert all(np.array_equal(crop(img), o) for o in outs[:20])
    t = T.RandomCrop((4, 6))(gpudiff.tensor(img))
    assert gpudiff.is_tensor(t) and t.shape == (1, 4, 6)
    assert T.RandomCrop(10, pad_if_needed=True)(img).shape == (1, 10, 10)
    reflect = T.RandomCrop(8, padding=1, padding_mode="reflect")(img)
    assert reflect.min() > 0                                # no zeros from reflection
    with pytest.raises(ValueError, match="larger than input image"):
        T.RandomCrop(9)(img)


def test_random_horizontal_flip():
    img = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    np.testing.assert_array_equal(T.RandomHorizontalFlip(p=1.0)(img), img[:, :, ::-1])
    np.testing.assert_array_equal(T.RandomHorizontalFlip(p=0.0)(img), img)
    gpudiff.manual_seed(1)
    flips = [not np.array_equal(T.RandomHorizontalFlip()(img), img) for _ in range(1000)]
    assert 430 < sum(flips) < 570                           # p = 0.5, 4.4 sigma
    t = T.RandomHorizontalFlip(p=1.0)(gpudiff.tensor(img))
    assert gpudiff.is_tensor(t) and t.tolist() == [[[2, 1, 0], [5, 4, 3]]]
    np.testing.assert_array_equal(T.RandomVerticalFlip(p=1.0)(img), img[:, ::-1, :])


def test_compose_and_others():
    img = np.ones((1, 4, 4), np.float32)
    tf = T.Compose([T.Pad(1), T.CenterCrop(5), T.Lambda(lambda x: x * 3)])
    out = tf(img)                # 6 x 6 padded; the centre 5 x 5 starts at round(0.5) = 0
    assert out.shape == (1, 5, 5) and out[0, 0, 0] == 0 and out[0, 1, 1] == 3
    assert out[0, 4, 4] == 3 and out[0, 0].tolist() == [0] * 5
    assert "Pad" in repr(tf) and "CenterCrop" in repr(tf)
    hwc = np.full((2, 3, 3), 255, np.uint8)
    t = T.ToTensor()(hwc)
    assert gpudiff.is_tensor(t) and t.shape == (3, 2, 3) and float(t.numpy().max()) == 1.0
    import gpudiff.transforms as GT
    assert GT.Normalize is T.Normalize


@pytest.mark.skipif(not gpudiff.cuda.is_available(), reason="needs a (real or emulated) cuda "
                    "device: run with GPUDIFF_CUDA=emulate")
def test_transforms_keep_the_device():
    img = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    x = gpudiff.tensor(img, device="cuda")
    tf = T.Compose([T.RandomCrop(4, padding=1), T.RandomHorizontalFlip(p=1.0),
                    T.Normalize((1.0, 2.0), (2.0, 4.0))])
    y = tf(x)
    assert y.device.type == "cuda" and y.shape == (2, 4, 4)
    y = T.Normalize((1.0, 2.0), (2.0, 4.0))(T.RandomHorizontalFlip(p=1.0)(x))
    expect = (img[:, :, ::-1] - np.array([1.0, 2.0], np.float32)[:, None, None]) / \
        np.array([2.0, 4.0], np.float32)[:, None, None]
    np.testing.assert_allclose(y.cpu().numpy(), expect, rtol=1e-6)
