"""Every file `gpudiff train` writes is replaced atomically: a crash or `kill -9` at any
moment leaves the previous complete file (issue 17: a kill mid-run had left a 0-byte
curves.png)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gpudiff import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HISTORY = [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.1, "test_acc": 0.4,
            "lr": 0.1, "time_s": 1.0, "samples_per_s": 10.0}]


def _check_outputs(d):
    """Each output present is complete: JSON parses, the CSV has its header, the PNG ends
    with its IEND chunk, the checkpoint loads. (A kill mid-write may leave the hidden
    temporary file it was writing, .NAME.*.tmp, beside the intact NAME.)"""
    names = os.listdir(d)
    if "metrics.json" in names:
        json.loads((d / "metrics.json").read_text())
    if "metrics.csv" in names:
        assert (d / "metrics.csv").read_text().startswith("epoch,train_loss")
    if "curves.png" in names:
        png = (d / "curves.png").read_bytes()
        assert png.startswith(b"\x89PNG") and png.endswith(b"IEND\xaeB`\x82"), len(png)
    if "checkpoint" in names:
        from gpudiff import load
        assert "model" in load(str(d / "checkpoint"))


def test_a_failed_write_keeps_the_previous_files(tmp_path, monkeypatch):
    T.write_metrics(str(tmp_path), {"epochs": HISTORY})
    T.plot_curves(str(tmp_path / "curves.png"), HISTORY)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def boom(fd):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        T.write_metrics(str(tmp_path), {"epochs": HISTORY * 2})
    with pytest.raises(OSError, match="simulated"):
        T.plot_curves(str(tmp_path / "curves.png"), HISTORY * 2)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("delay", [0.0, 0.35])
def test_kill_9_mid_run_leaves_complete_files(tmp_path, delay):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "gpudiff", "train", "--model", "lenet",
                          "--limit", "300", "--epochs", "1000", "--out", str(out),
                          "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        t_end = time.monotonic() + 120
        while not (out / "curves.png").exists() and time.monotonic() < t_end:
            time.sleep(0.01)
        assert (out / "curves.png").exists(), "no output within 120 s"
        time.sleep(delay)
        for _ in range(5):          # kill it while it is rewriting its files
            time.sleep(0.013)
            _check_outputs(out)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    _check_outputs(out)
