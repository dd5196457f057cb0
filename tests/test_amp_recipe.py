"""The AMP recipe (autocast + GradScaler + unscale_ + clip_grad_norm_) trains the Digits CNN in
bfloat16 on the CPU and in float16 on the (emulated) cuda device to within 1 point of the
float32 accuracy; a float16 overflow never writes inf/NaN into the parameters (the step is
skipped and the scale backs off)."""
import numpy as np
import pytest

import gpudiff
import gpudiff.nn as nn
import gpudiff.nn.functional as F
from gpudiff.datasets import Digits


def _arrays(train):
    ds = Digits(train=train)
    return (ds.data.astype(np.float32) / 16.0)[:, None], ds.targets.astype(np.int64)


XTR, YTR = _arrays(True)
XTE, YTE = _arrays(False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def train(device, amp_dtype=None, epochs=3, batch=128, init_scale=2.0 ** 16, steps=None):
    """The recipe; amp_dtype None: plain float32. Returns (accuracy, scaler, model, skipped)."""
    gpudiff.manual_seed(0)
    model = Net().to(device)
    opt = gpudiff.optim.Adam(model.parameters(), lr=0.01)
    use_amp = amp_dtype is not None
    scaler = gpudiff.amp.GradScaler(device, init_scale=init_scale,
                                    enabled=use_amp and amp_dtype == gpudiff.float16)
    rng = np.random.default_rng(0)
    skipped, n = 0, 0
    for _ in range(epochs):
        order = rng.permutation(len(XTR))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x = gpudiff.tensor(XTR[idx], device=device)
            y = gpudiff.tensor(YTR[idx], device=device)
            opt.zero_grad()
            with gpudiff.autocast(device, dtype=amp_dtype, enabled=use_amp):
                out = model(x)
                loss = F.cross_entropy(out, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gpudiff.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < before
            for p in model.parameters():
                assert p.dtype == gpudiff.float32
                assert bool(gpudiff.isfinite(p).all()), "a parameter took inf/NaN"
            n += 1
            if steps is not None and n >= steps:
                return None, scaler, model, skipped
    model.eval()
    with gpudiff.no_grad(), gpudiff.autocast(device, dtype=amp_dtype, enabled=use_amp):
        pred = model(gpudiff.tensor(XTE, device=device)).argmax(1)
    return float((pred.cpu().numpy() == YTE).mean()), scaler, model, skipped


@pytest.fixture(scope="module")
def fp32_accuracy():
    acc, *_ = train("cpu")
    assert acc >= 0.9, acc
    return acc


def test_bf16_autocast_on_cpu_within_one_point_of_fp32(fp32_accuracy):
    acc, scaler, model, skipped = train("cpu", gpudiff.bfloat16)
    assert abs(acc - fp32_accuracy) <= 0.01, (acc, fp32_accuracy)


def _fast_emulated_convs(monkeypatch):
    """On the emulator the tensor-core convolutions cost ~0.5 s a call (a warp meeting per
    mma; their own tests cover them): the recipe takes the im2col + GEMM path there."""
    if gpudiff.cuda.is_emulated():
        monkeypatch.setattr(gpudiff.backends.cudnn, "enabled", False)


def test_fp16_autocast_with_grad_scaler_on_cuda_within_one_point_of_fp32(fp32_accuracy):
    if not gpudiff.cuda.is_available():
        pytest.skip("no cuda device (GPUDIFF_CUDA=emulate)")
    # the emulator runs the kernels ~10x slower than NumPy: the 36 steps take the device's
    # reference path there (the overflow test below runs the kernels, the fused unscale
    # among them; the kernels have their own tests)
    with gpudiff.runtime.use_kernels(not gpudiff.cuda.is_emulated()):
        acc, scaler, model, skipped = train("cuda", gpudiff.float16)
    assert scaler.is_enabled()
    assert abs(acc - fp32_accuracy) <= 0.01, (acc, fp32_accuracy)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (NumPy on the inf gradients)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp16_overflow_skips_the_step_and_never_writes_inf(device, monkeypatch):
    if device == "cuda" and not gpudiff.cuda.is_available():
        pytest.skip("no cuda device (GPUDIFF_CUDA=emulate)")
    if device == "cuda":
        _fast_emulated_convs(monkeypatch)
    gpudiff.manual_seed(0)
    start = {k: v.detach().cpu().numpy().copy() for k, v in Net().state_dict().items()}
    # a scale of 2**40 overflows float16 gradients at once: the first steps are skipped
    _, scaler, model, skipped = train(device, gpudiff.float16, init_scale=2.0 ** 40, steps=3)
    assert skipped >= 1 and scaler.get_scale() < 2.0 ** 40
    for k, v in model.state_dict().items():
        a = v.detach().cpu().numpy()
        assert np.isfinite(a).all(), f"{k} took inf/NaN"
    if skipped == 3:  # every step skipped: the parameters are exactly the initial ones
        for k in ("conv1.weight", "fc.weight"):
            np.testing.assert_array_equal(model.state_dict()[k].detach().cpu().numpy(),
                                          start[k])
