"""gpudiff.save / gpudiff.load: round trips, corrupt files, hostile JSON, atomic saves,
no code execution."""
import collections
import io
import json
import math
import os
import pickle

import numpy as np
import pytest
import safetensors.numpy

import gpudiff
from gpudiff import serialization
from gpudiff.serialization import load, save


def _ckpt():
    w = gpudiff.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    return {
        "model": collections.OrderedDict([
            ("conv.weight", w),
            ("conv.bias", gpudiff.tensor(np.array([0.5, -1.5], dtype=np.float16))),
            ("bn.num_batches_tracked", gpudiff.tensor(np.array(7, dtype=np.int64))),
            ("mask", gpudiff.tensor(np.array([True, False, True]))),
            ("idx", gpudiff.tensor(np.array([[1, -2]], dtype=np.int32))),
            ("f64", gpudiff.tensor(np.array([1e-300, math.pi], dtype=np.float64))),
            ("empty", gpudiff.tensor(np.zeros((0, 4), dtype=np.float32))),
            ("u8", gpudiff.tensor(np.array([0, 255], dtype=np.uint8))),
        ]),
        "optimizer": {
            "state": {0: {"step": 3, "exp_avg": gpudiff.tensor(np.full(3, 0.25, np.float32))},
                      1: {}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1],
                              "foreach": None, "nesterov": False, "name": "group"}],
        },
        "epoch": 12,
        "best": float("inf"),
        "worst": float("-inf"),
        "undefined": float("nan"),
        "huge": 2 ** 100,
        "tied": w,                                   # the same tensor twice: stored once
        "rng": gpudiff.get_rng_state(),              # numpy PCG64 state: nested dict, big ints
        "np": np.arange(4, dtype=np.uint32),
        "dtype": gpudiff.float32,
        "nested": [[1, [2, (3, "x")]], {None: True, 2.5: "f", False: 0}],
    }


def _assert_same(a, b, where="root"):
    assert type(a) is type(b) or (gpudiff.is_tensor(a) and gpudiff.is_tensor(b)), \
        (where, type(a), type(b))
    if gpudiff.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy(), err_msg=where)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_round_trip_nested_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    ck = _ckpt()
    save(ck, path)
    back = load(path)
    # requires_grad is not restored (state dicts hold detached tensors), everything else is
    _assert_same(back, {**ck, "model": collections.OrderedDict(
        (k, v.detach()) for k, v in ck["model"].items()), "tied": ck["tied"].detach()})
    assert type(back["model"]) is collections.OrderedDict
    assert back["model"]["bn.num_batches_tracked"].shape == ()       # 0-d stays 0-d
    assert back["model"]["empty"].shape == (0, 4)
    assert not back["model"]["conv.weight"].requires_grad
    assert back["tied"] is back["model"]["conv.weight"]
    assert back["model"]["conv.weight"].device.type == "cpu"
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert isinstance(back["np"], np.ndarray) and back["np"].dtype == np.uint32
    assert back["dtype"] == np.float32
    assert back["huge"] == 2 ** 100
    # loaded tensors are ordinary writable tensors
    back["model"]["conv.weight"].add_(1)
    assert back["model"]["conv.weight"].numpy()[0, 0] == 1.0


def test_rng_state_round_trip_restores_the_stream(tmp_path):
    gpudiff.manual_seed(123)
    gpudiff.rand(5)
    save({"rng": gpudiff.get_rng_state()}, tmp_path / "r.st")
    expected = gpudiff.rand(4).numpy()
    gpudiff.manual_seed(999)
    gpudiff.set_rng_state(load(tmp_path / "r.st")["rng"])
    np.testing.assert_array_equal(gpudiff.rand(4).numpy(), expected)


def test_flat_state_dict_is_a_plain_safetensors_file(tmp_path):
    """Tensors are named by their key: other safetensors readers see a normal state dict."""
    import torch
    from safetensors.torch import load_file
    sd = {"fc.weight": gpudiff.tensor(np.arange(6, dtype=np.float32).reshape(3, 2)),
          "fc.bias": gpudiff.tensor(np.array([1.0, 2.0, 3.0], dtype=np.float32))}
    save(sd, tmp_path / "sd.safetensors")
    t = load_file(str(tmp_path / "sd.safetensors"))
    assert sorted(t) == ["fc.bias", "fc.weight"]
    assert torch.equal(t["fc.weight"], torch.arange(6, dtype=torch.float32).reshape(3, 2))
    # and a safetensors file written by someone else loads as a flat dict of tensors
    safetensors.numpy.save_file({"a": np.ones((2, 2), np.float64)}, str(tmp_path / "x.st"))
    other = load(tmp_path / "x.st")
    assert list(other) == ["a"] and other["a"].dtype == np.float64
    np.testing.assert_array_equal(other["a"].numpy(), np.ones((2, 2)))


def test_file_objects(tmp_path):
    buf = io.BytesIO()
    save({"x": gpudiff.tensor([1.0, 2.0]), "n": 3}, buf)
    buf.seek(0)
    back = load(buf)
    assert back["n"] == 3 and back["x"].tolist() == [1.0, 2.0]


def test_map_location(tmp_path):
    path = tmp_path / "m.st"
    save({"w": gpudiff.tensor([1.0, 2.0])}, path)
    assert load(path, map_location="cpu")["w"].device.type == "cpu"
    assert load(path, map_location=gpudiff.device("cpu"))["w"].device.type == "cpu"
    seen = []

    def fn(t, saved):
        seen.append(saved)
        return t * 2
    assert load(path, map_location=fn)["w"].tolist() == [2.0, 4.0]
    assert seen == ["cpu"]
    assert load(path, map_location={"cuda:0": "cpu"})["w"].device.type == "cpu"
    assert load(path, weights_only=True)["w"].tolist() == [1.0, 2.0]   # PyTorch's kwarg
    if gpudiff.cuda.is_available():
        t = load(path, map_location="cuda")["w"]
        assert t.device.type == "cuda" and t.cpu().tolist() == [1.0, 2.0]


def test_unsupported_objects_raise_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"cannot save a .*object at a\.b"):
        save({"a": {"b": object()}}, tmp_path / "x.st")
    with pytest.raises(TypeError, match="dict key"):
        save({(1, 2): 3}, tmp_path / "x.st")
    with pytest.raises(TypeError, match="complex128"):
        save({"z": np.zeros(2, np.complex128)}, tmp_path / "x.st")
    cyclic = {"a": []}
    cyclic["a"].append(cyclic)
    with pytest.raises(ValueError, match="refers to itself at a.0"):
        save(cyclic, tmp_path / "x.st")
    deep = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):   # what load() would refuse
        save(deep, tmp_path / "x.st")
    assert not os.path.exists(tmp_path / "x.st")
    assert os.listdir(tmp_path) == []                  # and no temporary file left behind


# ---- corrupt and hostile files ---------------------------------------------------------
@pytest.fixture
def good_bytes(tmp_path):
    path = tmp_path / "good.st"
    save(_ckpt(), path)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -200, -1])
def test_truncated_file_raises_clear_error(tmp_path, good_bytes, cut):
    path = tmp_path / "trunc.st"
    path.write_bytes(good_bytes[:cut] if cut else b"")
    with pytest.raises(ValueError, match=r"trunc\.st.*(truncated|too short|corrupt)"):
        load(path)


def test_random_bytes_raise_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(20):
        path = tmp_path / f"rand{k}.bin"
        path.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 5000)),
                                      dtype=np.uint8).tobytes())
        with pytest.raises(ValueError, match=f"rand{k}.bin"):
            load(path)


def test_flipped_bytes_never_crash(tmp_path, good_bytes):
    """Corrupting any byte gives a ValueError or a loaded object, never another exception."""
    rng = np.random.default_rng(1)
    path = tmp_path / "flip.st"
    for pos in rng.integers(0, len(good_bytes), size=60):
        b = bytearray(good_bytes)
        b[pos] ^= 0xFF
        path.write_bytes(bytes(b))
        try:
            load(path)
        except ValueError as e:
            assert "flip.st" in str(e)


def _file_with_structure(path, doc, tensors=None):
    meta = {"gpudiff": doc if isinstance(doc, str) else json.dumps(doc)}
    path.write_bytes(safetensors.numpy.save(tensors or {"t": np.zeros(2, np.float32)},
                                            metadata=meta))
    return path


@pytest.mark.parametrize("root, msg", [
    ({"$pickle": "gASV"}, "unknown tag"),
    ({"$tensor": "missing"}, "does not contain"),
    ({"$tensor": ["t"]}, "does not contain"),
    ({"$tensor": "t", "device": 3}, "device must be a string"),
    ({"$dtype": "object"}, "unsupported dtype"),
    ({"$float": "1e999"}, r"\$float"),
    ({"$dict": [[{"$tuple": [1]}, 1]]}, "dict key"),
    ({"$dict": [[1, 2, 3]]}, "pairs"),
    ({"$dict": {"a": 1}}, "list of"),
    ({"$tuple": "abc"}, "list"),
    ({"a": 1}, "one '\\$' tag"),
    ({"$tuple": [], "$dict": []}, "one '\\$' tag"),
    ({"$ndarray": "t", "extra": 1}, "unexpected keys"),
])
def test_odd_json_is_refused(tmp_path, root, msg):
    path = _file_with_structure(tmp_path / "odd.st",
                                {"format": "gpudiff", "version": 1, "root": root})
    with pytest.raises(ValueError, match=msg) as e:
        load(path)
    assert "odd.st" in str(e.value)


def test_bad_headers_are_refused(tmp_path):
    p = tmp_path / "h.st"
    _file_with_structure(p, "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(p)
    _file_with_structure(p, {"format": "gpudiff", "version": 99, "root": 1})
    with pytest.raises(ValueError, match="newer"):
        load(p)
    _file_with_structure(p, {"format": "other", "version": 1, "root": 1})
    with pytest.raises(ValueError, match="not a gpudiff structure"):
        load(p)
    _file_with_structure(p, "[" * 100000 + "]" * 100000)     # deep nesting: no RecursionError
    with pytest.raises(ValueError):
        load(p)
    doc = json.dumps({"format": "gpudiff", "version": 1, "root": 0}).replace(
        '"root": 0', '"root": ' + "[" * 500 + "1" + "]" * 500)
    _file_with_structure(p, doc)
    with pytest.raises(ValueError, match="nested deeper"):
        load(p)
    # a header length that points past the end of the file
    p.write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="truncated"):
        load(p)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM_MARKER",))


def test_loading_a_pickle_runs_no_code(tmp_path, monkeypatch):
    """A pickle (what torch.save writes, and the classic code-execution vector) is refused."""
    import torch
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": _Boom()}))
    torch.save({"x": torch.zeros(2)}, tmp_path / "torch.pt")
    for name in ("evil.pkl", "torch.pt"):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load(tmp_path / name)
    assert not (tmp_path / "BOOM_MARKER").exists()
    # and the module never imports pickle for loading
    assert "pickle" not in serialization.__dict__


# ---- atomic saves ------------------------------------------------------------------------
def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.st"
    save({"epoch": 1, "w": gpudiff.tensor([1.0])}, path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device (simulated)")
    monkeypatch.setattr(serialization.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="simulated"):
        save({"epoch": 2, "w": gpudiff.tensor([2.0])}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.st"]            # the temporary file was removed


def test_interrupted_write_leaves_old_file_intact(tmp_path, monkeypatch):
    """A crash halfway through writing the bytes (simulated: half written, then an error)."""
    path = tmp_path / "ckpt.st"
    save({"epoch": 1}, path)
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(serialization.os, "fdopen",
                        lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        save({"epoch": 2, "w": gpudiff.zeros(1000)}, path)
    monkeypatch.undo()
    assert load(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["ckpt.st"]


def test_save_replaces_and_keeps_permissions(tmp_path):
    path = tmp_path / "ckpt.st"
    save({"epoch": 1}, path)
    os.chmod(path, 0o640)
    save({"epoch": 2}, path)
    assert load(path) == {"epoch": 2}
    assert os.stat(path).st_mode & 0o777 == 0o640
