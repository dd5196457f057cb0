"""The per-op dispatch table of `gpudiff bench` (gpudiff/benchmark.py dispatch_table)."""
import gpudiff
from gpudiff import benchmark


def test_dispatch_rows_cover_every_case_device_and_framework(monkeypatch):
    monkeypatch.setattr(benchmark, "DISPATCH_CALLS", 20)
    devices = ("cpu", "cuda") if gpudiff.cuda.is_available() else ("cpu",)
    rows = benchmark.dispatch_table(devices, torch=True)
    seen = {(r["case"], r["grad"], r["framework"], r["device"].split(" ")[0]) for r in rows}
    for case in benchmark.DISPATCH_CASES:
        for grad in ((True,) if case == "linear fwd+bwd" else (False, True)):
            for dev in devices:
                assert (case, grad, "gpudiff", dev) in seen
            assert (case, grad, "torch", "cpu") in seen
    assert all(r["us"] > 0 for r in rows)
    emulated = [r for r in rows if "emulated" in r["device"]]
    assert all(r["measured"].startswith("profiler") for r in emulated)
    text = benchmark.dispatch_text(rows)
    assert "gpudiff/torch cpu" in text and "linear fwd+bwd" in text


def test_tiny_mlp_is_a_step_case():
    names = [c.name for c in benchmark.cases(quick=True)]
    assert "tiny-mlp train step" in names
