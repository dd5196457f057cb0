"""`gpudiff train` and `gpudiff bench`: argument errors, outputs, exact resume, Ctrl-C, bench.

Kept small (slices of Digits, tiny benchmark shapes) so the whole file runs in well under a
minute on a 2-core CPU.
"""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import gpudiff
from gpudiff.cli import main
from gpudiff.serialization import load
from gpudiff.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small, quick run: 160 training / 160 test digits, 5 batches per epoch
QUICK = ["--limit", "160", "--batch-size", "32", "--no-progress"]
METRIC_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


def _errors(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()]


# ---- argument errors: exit status 2 and one line on stderr --------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "alexnet"], "invalid choice: 'alexnet'"),
    (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--batch-size", "many"], "--batch-size"),
    (["train", "--dataset", "mnist"], "needs --data-dir"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "no such directory"),
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--no-such-option"], "unrecognized arguments"),
    (["fly"], "invalid choice: 'fly'"),
    (["bench", "--device", "tpu"], "unknown device 'tpu'"),
])
def test_usage_errors_are_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))
    assert e.value.code == 2
    lines = _errors(capsys)
    assert len(lines) == 1, lines
    assert needle in lines[0] and "error" in lines[0]


def test_missing_dataset_files_is_one_line(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and "not found" in lines[0] and "mnist" in lines[0], lines


def _run(args, **env):
    return subprocess.run([sys.executable, "-m", "gpudiff", *args], check=False,
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **env})


def test_cuda_asked_for_but_absent():
    # GPUDIFF_CUDA=off: a process without CUDA, even on a GPU machine (the tests' own process
    # has the emulator)
    p = _run(["train", "--device", "cuda"], GPUDIFF_CUDA="off")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], lines


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("not a directory")
    assert main(["train", "--out", str(f), "--limit", "16", "--no-progress"]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and "cannot create the directory" in lines[0], lines


def test_resume_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and "no checkpoint" in lines[0], lines


def test_python_dash_m_no_traceback():
    # the real process: `python -m gpudiff` exits 2 with one line, no traceback
    p = _run(["train", "--model", "vgg"])
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "invalid choice: 'vgg'" in p.stderr


# ---- a real run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """An uninterrupted 2-epoch run of mnist-cnn (it has dropout: the RNG state matters)."""
    out = tmp_path_factory.mktemp("straight")
    assert main(["train", "--model", "mnist-cnn", "--epochs", "2", "--out", str(out),
                 "--seed", "3", *QUICK]) == 0
    return out


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_one_epoch_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    stdout = capsys.readouterr().out
    assert "epoch 1/1" in stdout and "test" in stdout and "img/s" in stdout
    for name in ("checkpoint", "metrics.json", "metrics.csv", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    m = _metrics(out)
    assert m["config"]["model"] == "resnet-small" and m["config"]["dataset"] == "digits"
    assert m["device"].startswith("cpu")   # auto never picks the emulator
    assert m["data"]["n_train"] == 160 and m["data"]["image_size"] == 8
    (e,) = m["epochs"]
    assert e["epoch"] == 1
    # 10 classes: a fresh net's loss is near ln(10) = 2.30; one epoch must not blow up
    assert 0.1 < e["train_loss"] < 3.0 and math.isfinite(e["test_loss"])
    assert 0.0 <= e["train_acc"] <= 1.0 and 0.0 <= e["test_acc"] <= 1.0
    assert e["samples_per_s"] > 0 and e["lr"] == pytest.approx(0.1)
    assert m["final_test_acc"] == e["test_acc"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 2
    ckpt = load(str(out / "checkpoint"))
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0
    assert {"model", "optimizer", "scheduler", "rng", "history"} <= set(ckpt)
    assert "layers.0.conv1.weight" in ckpt["model"]
    # the same out again without --resume is refused (it would overwrite the run)
    assert main(["train", "--epochs", "1", "--out", str(out), *QUICK]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_training_learns():
    # 3 epochs on 480 digits (~80% in practice): far above chance (10%), so it really trains
    cfg = TrainConfig(model="mnist-cnn", epochs=3, limit=480, batch_size=32, augment=False,
                      out=None, progress=False)
    r = train(cfg, log=lambda s: None)
    try:
        assert r["history"][-1]["test_acc"] > 0.6
        assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    finally:
        import shutil
        shutil.rmtree(r["out"], ignore_errors=True)


def _same_history(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in METRIC_KEYS:
            assert x[k] == y[k], (k, x, y)


def _same_weights(dir_a, dir_b):
    a, b = load(str(dir_a / "checkpoint")), load(str(dir_b / "checkpoint"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        np.testing.assert_array_equal(a["model"][k].numpy(), b["model"][k].numpy(), err_msg=k)


def test_resume_reproduces_uninterrupted_run(two_epochs, tmp_path):
    out = tmp_path / "resumed"
    common = ["--model", "mnist-cnn", "--out", str(out), "--seed", "3", *QUICK]
    assert main(["train", "--epochs", "1", *common]) == 0
    assert len(_metrics(out)["epochs"]) == 1
    assert main(["train", "--epochs", "2", "--out", str(out), "--resume", "--no-progress"]) == 0
    _same_history(_metrics(out)["epochs"], _metrics(two_epochs)["epochs"])
    _same_weights(out, two_epochs)


def test_ctrl_c_saves_and_resume_is_exact(two_epochs, tmp_path, capsys):
    # Ctrl-C in the middle of epoch 1 (after step 3 of 5): checkpoint, clean stop, and the
    # resumed run ends exactly where the uninterrupted one did
    out = tmp_path / "interrupted"

    def ctrl_c(epoch, step):
        if (epoch, step) == (1, 3):
            os.kill(os.getpid(), signal.SIGINT)

    cfg = TrainConfig(model="mnist-cnn", epochs=2, seed=3, limit=160, batch_size=32,
                      out=str(out), progress=False)
    r = train(cfg, on_step=ctrl_c)
    assert r["interrupted"] and len(r["history"]) == 1
    assert "interrupted (epoch 2, step 3/5): checkpoint saved" in capsys.readouterr().out
    ckpt = load(str(out / "checkpoint"))
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    _same_history(_metrics(out)["epochs"], _metrics(two_epochs)["epochs"])
    _same_weights(out, two_epochs)


def test_resume_refuses_a_different_run(two_epochs, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    (out / "checkpoint").write_bytes((two_epochs / "checkpoint").read_bytes())
    assert main(["train", "--out", str(out), "--resume", "--model", "lenet"]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and "--model lenet differs" in lines[0], lines


# ---- the other data sets, from small fake files in their standard formats --------------------
def _fake_mnist(root, folder, n_train=48, n_test=24):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        # IDX: zero, zero, dtype 0x08 (uint8), ndim; big-endian uint32 sizes; the data
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes() + labels.tobytes())


def _fake_cifar10(root, n_per_batch=8, n_test=16):
    import pickle
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(k % 10) for k in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)   # the original files are protocol-2 pickles


@pytest.mark.parametrize("dataset, folder, model, shape", [
    ("mnist", "MNIST", "lenet", (1, 28)),
    ("fashion-mnist", "FashionMNIST", "mnist-cnn", (1, 28)),
    ("cifar10", None, "resnet-small", (3, 32)),
])
def test_other_datasets(dataset, folder, model, shape, tmp_path):
    if dataset == "cifar10":
        _fake_cifar10(tmp_path / "data")
    else:
        _fake_mnist(tmp_path / "data", folder)
    out = tmp_path / "run"
    assert main(["train", "--dataset", dataset, "--data-dir", str(tmp_path / "data"),
                 "--model", model, "--epochs", "1", "--batch-size", "16", "--out", str(out),
                 "--no-progress"]) == 0
    m = _metrics(out)
    assert (m["data"]["in_channels"], m["data"]["image_size"]) == shape
    assert m["data"]["n_train"] == (40 if dataset == "cifar10" else 48)
    assert len(m["epochs"]) == 1 and math.isfinite(m["epochs"][0]["train_loss"])


# ---- bench --------------------------------------------------------------------------------
def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench"
    # the quick suite minus its two slowest training steps, 2 rounds: a few seconds
    argv = ["bench", "--quick", "--device", "cpu", "--repeat", "2", "--out", str(out),
            "--only", "lenet,conv2d,max_pool2d,relu,cross_entropy"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    doc = json.loads((out / "bench.json").read_text())
    with open(out / "bench.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    m = doc["machine"]
    assert m["cpu"] and m["date"] and m["cpu_count"] >= 1 and "gpu" in m
    cases = {r["case"] for r in doc["results"]}
    assert cases == {"lenet train step", "lenet train step captured",
                     "conv2d 3x3 fwd", "conv2d 3x3 fwd+bwd",
                     "max_pool2d 2x2 fwd", "max_pool2d 2x2 fwd+bwd", "relu fwd+bwd",
                     "cross_entropy fwd+bwd"}
    for r in doc["results"]:
        assert len(r["times_ms"]) == 2 and r["min_ms"] == min(r["times_ms"])
        assert 0 < r["min_ms"] <= r["median_ms"] and r["device"] == "cpu"
        assert not r["emulated"]
    assert "conv2d 3x3 fwd+bwd" in stdout and "median (min) ms" in stdout
    try:
        import torch  # noqa: F401
    except ImportError:
        assert {r["framework"] for r in doc["results"]} == {"gpudiff"}
    else:
        assert {r["framework"] for r in doc["results"]} == {"gpudiff", "torch"}
        assert "gpudiff/torch cpu" in stdout
        ratio = doc["ratios"]["relu fwd+bwd"]["gpudiff/torch cpu"]
        by = {r["backend"]: r for r in doc["results"] if r["case"] == "relu fwd+bwd"}
        assert ratio == pytest.approx(by["gpudiff cpu"]["median_ms"]
                                      / by["torch cpu"]["median_ms"], rel=1e-2)
        # same initial weights and data: both frameworks see the same eval loss
        steps = [r for r in doc["results"] if r["case"] == "lenet train step"]
        assert steps[0]["eval_loss"] == pytest.approx(steps[1]["eval_loss"], rel=1e-4)
        # the captured step (gpudiff.Graph) is timed next to PyTorch's eager CPU step
        graph = {r["backend"]: r for r in doc["results"]
                 if r["case"] == "lenet train step captured"}
        assert set(graph) == {"gpudiff cpu", "torch cpu"}
        assert "lenet train step captured" in stdout


def test_bench_emulated_is_labelled(tmp_path, capsys):
    if not gpudiff.cuda.is_emulated():
        pytest.skip("the tests run with a real GPU")
    argv = ["bench", "--quick", "--device", "cpu,cuda", "--repeat", "1", "--warmup", "0",
            "--only", "relu", "--no-torch", "--out", str(tmp_path)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["machine"]["gpu_emulated"] is True
    labels = {r["backend"]: r["emulated"] for r in doc["results"]}
    assert labels == {"gpudiff cpu": False, "gpudiff cuda (emulated)": True}
    # never presented as a GPU number: no CPU/GPU ratio
    assert "speedup" not in stdout and doc["ratios"]["relu fwd+bwd"] == {}
    assert "gpudiff cuda (emulated)" in stdout


def test_bench_bad_only(capsys):
    assert main(["bench", "--quick", "--only", "nothing-like-this"]) == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and "no case matches" in lines[0], lines


def test_train_on_emulated_cuda_says_so(tmp_path, capsys):
    if not gpudiff.cuda.is_emulated():
        pytest.skip("the tests run with a real GPU")
    out = tmp_path / "emu"
    assert main(["train", "--device", "cuda", "--model", "lenet", "--epochs", "1",
                 "--limit", "32", "--batch-size", "32", "--out", str(out),
                 "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "device: cuda:0 (emulated" in stdout
    assert "emulated" in _metrics(out)["device"]


def test_bench_cpu_script_shares_the_implementation(tmp_path):
    # bench/bench_cpu.py is a thin wrapper over gpudiff.benchmark: same cases, same JSON
    out = tmp_path / "cpu.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_cpu.py"),
                        "--models", "lenet", "--reps", "1", "--warmup", "0", "--no-ops",
                        "--out", str(out)], check=False, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "gpudiff.benchmark"
    assert doc["settings"]["source"] == "bench/bench_cpu.py"
    assert {r["case"] for r in doc["results"]} == {"lenet train step",
                                                   "lenet train step captured"}
    assert (tmp_path / "cpu.png").is_file()
