"""gpudiff.profiler: rows and counts of a small model's training step on cpu and on the
emulated cuda device, the time split (dispatch + kernel <= total, self <= total), the kernel
that ran, record_function nesting, the Chrome trace, and ``gpudiff train --profile``."""
import json
import os

import pytest

import gpudiff
import gpudiff.nn.functional as F
from gpudiff import nn, optim
from gpudiff.profiler import ProfilerActivity, profile, record_function
from gpudiff.runtime import events

EPS = 1e-6   # µs: trace times are rounded to the nanosecond


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


def _step(model, opt, x, y):
    opt.zero_grad()
    with record_function("forward"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _profiled(device, **kw):
    model = Small().to(device)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = gpudiff.randn(8, 1, 8, 8).to(device)
    y = gpudiff.randint(0, 10, (8,)).to(device)
    _step(model, opt, x, y)                            # warm-up
    with profile(activities=[ProfilerActivity.CPU], **kw) as prof, record_function("step"):
        _step(model, opt, x, y)
    return prof


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def prof(request):
    gpudiff.manual_seed(0)
    return request.param, _profiled(request.param, record_shapes=True)


def _rows(p):
    return {r.key: r for r in p.key_averages()}


def test_rows_and_counts(prof):
    device, p = prof
    rows = _rows(p)
    # nn.Linear is one 'linear' op; on the cpu its backward node runs two GEMMs of our C++
    # matmul on raw arrays (kernel rows; cuda has no matmul kernel of ours: xp.matmul), as
    # conv2d's backward runs the conv2d_backward_weight kernel
    gemms = [("matmul", 2)] if device == "cpu" else []
    for name, count in gemms + [("conv2d", 1), ("relu", 1), ("max_pool2d", 1), ("linear", 1),
                                ("LinearBackward0", 1), ("step", 1), ("forward", 1),
                                ("Conv2dBackward0", 1), ("conv2d_backward_weight", 1),
                                ("sgd_step", 1)]:
        assert name in rows, (name, sorted(rows))
        assert rows[name].count == count, (name, rows[name].count)
    label = "cuda (emulated)" if device == "cuda" else "cpu"
    assert rows["conv2d"].device == label
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    lines = table.splitlines()
    header = lines[1]
    for col in ("Name", "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg",
                "Dispatch", "Kernel", "# of Calls", "Device", "Kernel that ran"):
        assert col in header
    seps = [i for i, ln in enumerate(lines) if ln.startswith("---")]
    assert len(seps) == 3 and seps[2] - seps[1] - 1 == 10     # row_limit rows
    assert "Self CPU time total:" in table
    if device == "cuda":
        assert "emulated" in table


def test_time_split(prof):
    _, p = prof
    for e in p.events():
        assert e.self_cpu_time_total <= e.cpu_time_total + EPS
        assert e.dispatch_time_total + e.kernel_time_total <= e.cpu_time_total + EPS, e
    for r in p.key_averages():
        assert r.self_cpu_time_total <= r.cpu_time_total + EPS
        assert r.dispatch_time_total + r.kernel_time_total <= r.cpu_time_total + EPS
    total = p.key_averages().self_cpu_time_total
    assert total == pytest.approx(_rows(p)["step"].cpu_time_total, rel=1e-9)


def test_kernel_that_ran(prof):
    device, p = prof
    rows = _rows(p)
    if device == "cpu":
        assert rows["conv2d"].kernel == "C++ conv2d"
        assert rows["relu"].kernel == "C++ relu"
        assert rows["sgd_step"].kernel == "C++ sgd_step"
    else:
        conv = rows["conv2d"].kernel
        algo = gpudiff.backends.cuda.last_conv_algorithm   # the profiled step's conv ran last
        assert "CUDA conv2d_" in conv and conv.startswith(algo["forward"] + ": "), conv
        assert rows["conv2d_backward_weight"].kernel.startswith(algo["backward_weight"])
        assert rows["relu"].kernel.startswith("CUDA relu")
        assert rows["sgd_step"].kernel.startswith("CUDA sgd_step")
    assert rows["reshape"].kernel == "NumPy reference"


def test_record_function_nesting(prof):
    _, p = prof
    evs = p.events()
    step = next(e for e in evs if e.name == "step")
    fwd = next(e for e in evs if e.name == "forward")
    assert fwd.parent is step and step.parent is None
    conv = next(e for e in evs if e.name == "conv2d")
    assert conv.parent is fwd
    # total includes the ops inside; self excludes the children
    assert fwd.cpu_time_total >= sum(c.cpu_time_total for c in fwd.children) - EPS
    assert fwd.self_cpu_time_total == pytest.approx(
        fwd.cpu_time_total - sum(c.cpu_time_total for c in fwd.children), abs=EPS)
    # backward nodes hold the ops their formulas run
    bw = next(e for e in evs if e.name == "Conv2dBackward0")
    assert bw.parent is step
    assert "conv2d_backward_weight" in {c.name for c in bw.children}


def test_record_function_decorator_and_no_profiler():
    @record_function("double")
    def double(t):
        return t * 2

    double(gpudiff.ones(3))       # outside a profile: nothing recorded, no error
    with profile() as p, record_function("outer"):
        double(gpudiff.ones(3))
        double(gpudiff.ones(3))
    rows = _rows(p)
    assert rows["double"].count == 2 and rows["mul_scalar"].count == 2  # (t * 2: a Python number)
    outer = next(e for e in p.events() if e.name == "outer")
    assert [c.name for c in outer.children].count("double") == 2
    assert events.listener is None


def test_group_by_input_shape():
    with profile(record_shapes=True) as p:
        gpudiff.ones(2, 3).exp()
        gpudiff.ones(4).exp()
        gpudiff.ones(4).exp()
    rows = [r for r in p.key_averages(group_by_input_shape=True) if r.key == "exp"]
    assert sorted((r.input_shapes, r.count) for r in rows) == [(((2, 3),), 1), (((4,),), 2)]
    assert "Input Shapes" in p.key_averages(group_by_input_shape=True).table()
    with profile() as p2:
        gpudiff.ones(4).exp()
    with pytest.raises(RuntimeError, match="record_shapes"):
        p2.key_averages(group_by_input_shape=True)


def test_chrome_trace(prof, tmp_path):
    _, p = prof
    path = p.export_chrome_trace(str(tmp_path / "trace.json"))
    with open(path) as f:
        data = json.load(f)
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {"cpu_op", "backward", "user_annotation", "kernel"} <= {e["cat"] for e in xs}
    for e in xs:
        assert {"name", "ts", "dur", "pid", "tid", "args"} <= set(e) and e["dur"] >= 0
    conv = next(e for e in xs if e["name"] == "conv2d" and e["cat"] == "cpu_op")
    assert conv["args"]["Input Dims"] == [[8, 1, 8, 8], [4, 1, 3, 3], [4]]
    assert conv["args"]["kernel"]
    # complete events nest: sorted by start, each one ends inside the ones it starts in
    stack = []
    for e in sorted(xs, key=lambda e: (e["ts"], -e["dur"])):
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - EPS:
            stack.pop()
        if stack:
            top = stack[-1]
            assert e["ts"] + e["dur"] <= top["ts"] + top["dur"] + 2e-3, (e, top)
        stack.append(e)
    names = {e["name"] for e in xs}
    assert {"step", "forward", "conv2d", "Conv2dBackward0"} <= names


def test_start_stop_step_and_errors():
    p = profile()
    p.start()
    with pytest.raises(RuntimeError, match="another profiler"):
        profile().start()
    for _ in range(3):
        gpudiff.ones(3).exp()
        p.step()
    p.stop()
    assert events.listener is None
    steps = [e for e in p.events() if e.name.startswith("ProfilerStep#")]
    assert [e.name for e in steps] == ["ProfilerStep#0", "ProfilerStep#1", "ProfilerStep#2"]
    assert all(e.children and e.children[0].name == "exp" for e in steps)
    with pytest.raises(NotImplementedError, match="schedule"):
        profile(schedule=lambda step: None)
    with pytest.raises(ValueError, match="sort_by"):
        p.key_averages().table(sort_by="wall")
    # the kernel table and launch() are back as they were
    from gpudiff.runtime import kernels
    from gpudiff.runtime.cuda import launch
    assert not hasattr(kernels.KERNELS["cpu"]["relu"], "__wrapped__")
    assert not hasattr(launch._launch_emulated, "__wrapped__")


def test_train_profile_writes_table_and_trace(tmp_path):
    from gpudiff.cli import main
    out = tmp_path / "run"
    assert main(["train", "--model", "lenet", "--epochs", "1", "--limit", "160",
                 "--batch-size", "32", "--no-progress", "--device", "cpu", "--profile", "2",
                 "--out", str(out)]) == 0
    table = (out / "profile.txt").read_text()
    assert "2 training step(s)" in table and "C++ conv2d" in table
    assert "ProfilerStep#1" in table and "ProfilerStep#2" not in table
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("name") == "conv2d" for e in trace["traceEvents"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.gpu
@pytest.mark.skipif(gpudiff.runtime.cuda_mode() != "gpu", reason="needs a real GPU (CuPy)")
def test_cuda_times_on_a_gpu():   # not yet run on a GPU
    p = _profiled("cuda", activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    rows = _rows(p)
    assert rows["conv2d"].device == "cuda"
    assert rows["conv2d"].cuda_time_total > 0
    assert "Self CUDA" in p.key_averages().table()
