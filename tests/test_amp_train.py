"""`gpudiff train --amp fp16|bf16`: autocast + GradScaler around the step, the scaler's state
in the checkpoint (a resumed run continues it exactly), skipped steps counted in the metrics
and on the epoch line; bad values are one-line usage errors. Small runs (160 digits)."""
import functools
import json
import os

import numpy as np
import pytest

import gpudiff
from gpudiff.cli import main
from gpudiff.serialization import load

QUICK = ["--model", "mnist-cnn", "--limit", "160", "--batch-size", "32", "--no-progress",
         "--device", "cpu", "--seed", "3"]


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def fp16_two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("amp16")
    assert main(["train", "--amp", "fp16", "--epochs", "2", "--out", str(out), *QUICK]) == 0
    return out


def test_fp16_run_reports_scale_and_skipped_steps(fp16_two_epochs):
    m = _metrics(fp16_two_epochs)
    assert m["config"]["amp"] == "fp16"
    for e in m["epochs"]:
        assert e["skipped_steps"] >= 0 and e["loss_scale"] > 0
        assert np.isfinite(e["train_loss"]) and e["test_acc"] > 0.1
    ck = load(str(fp16_two_epochs / "checkpoint"))
    assert ck["scaler"]["scale"] == m["epochs"][-1]["loss_scale"]
    assert set(ck["scaler"]) == {"scale", "growth_factor", "backoff_factor", "growth_interval",
                                 "_growth_tracker"}
    if not any(e["skipped_steps"] for e in m["epochs"]):   # 10 clean steps in a row
        assert ck["scaler"]["_growth_tracker"] == 10 and ck["scaler"]["scale"] == 2.0 ** 16
    for v in ck["model"].values():
        assert v.dtype in (gpudiff.float32, gpudiff.int64)   # fp32 master weights


def test_resume_restores_the_scaler(fp16_two_epochs, tmp_path):
    out = tmp_path / "resumed"
    assert main(["train", "--amp", "fp16", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    assert main(["train", "--epochs", "2", "--out", str(out), "--resume", "--no-progress"]) == 0
    a, b = _metrics(out)["epochs"], _metrics(fp16_two_epochs)["epochs"]
    for x, y in zip(a, b):
        for k in ("train_loss", "test_acc", "loss_scale", "skipped_steps"):
            assert x[k] == y[k], (k, x, y)
    assert load(str(out / "checkpoint"))["scaler"] == \
        load(str(fp16_two_epochs / "checkpoint"))["scaler"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (NumPy on the inf gradients)
@pytest.mark.filterwarnings("ignore:Detected call of")  # (no optimizer step ran: as torch)
def test_overflowing_steps_are_skipped_and_reported(tmp_path, capsys, monkeypatch):
    # a loss scale of 2**40 overflows float16 at once: steps are skipped until it backs off
    monkeypatch.setattr(gpudiff.amp, "GradScaler",
                        functools.partial(gpudiff.amp.GradScaler, init_scale=2.0 ** 40))
    out = tmp_path / "overflow"
    assert main(["train", "--amp", "fp16", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("epoch 1/1")][0]
    (e,) = _metrics(out)["epochs"]
    assert e["skipped_steps"] == 5 and e["loss_scale"] == 2.0 ** 35   # every step skipped
    assert "amp fp16: 5 skipped step(s)" in line
    for k, v in load(str(out / "checkpoint"))["model"].items():
        assert np.isfinite(v.numpy()).all(), f"{k} took inf/NaN"


def test_bf16_run_trains_without_a_scaler(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["train", "--amp", "bf16", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    (e,) = _metrics(out)["epochs"]
    assert e["skipped_steps"] == 0 and e["loss_scale"] == 1.0 and e["test_acc"] > 0.1
    assert load(str(out / "checkpoint"))["scaler"] == {}
    assert "amp bf16" in capsys.readouterr().out


def test_bad_amp_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--amp", "fp8"])
    assert e.value.code == 2
    assert "--amp" in capsys.readouterr().err


def test_bench_has_amp_rows(tmp_path):
    from gpudiff import benchmark
    lines = []
    benchmark.run_cli(quick=True, devices="cpu", out=str(tmp_path), repeat=1, warmup=0,
                      only=["amp"], isolate=False, dispatch=False, log=lines.append)
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["backend"]: r for r in doc["results"]}
    assert {r["case"] for r in doc["results"]} == {"amp lenet train step"}
    assert rows["gpudiff cpu"]["median_ms"] > 0
    assert rows["gpudiff cpu"]["kind"] == "train step (amp)"
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    assert rows["torch cpu"]["median_ms"] > 0   # PyTorch's own autocast step beside ours
    assert any("amp lenet train step" in line for line in lines)
