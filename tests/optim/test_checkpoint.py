"""A model + optimizer + scheduler checkpoint (gpudiff.save / gpudiff.load) taken mid-run
resumes training exactly where it stopped."""
import numpy as np

import gpudiff
import gpudiff.nn.functional as F
from gpudiff import nn, optim


def build():
    gpudiff.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6], gamma=0.5)
    plateau = optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1)
    return model, opt, sched, plateau


def data(step):
    rng = np.random.default_rng(step)
    x = gpudiff.tensor(rng.standard_normal((6, 1, 5, 5)).astype(np.float32))
    y = gpudiff.tensor(rng.integers(0, 3, 6))
    return x, y


def train(model, opt, sched, plateau, steps):
    losses = []
    for step in steps:
        x, y = data(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        plateau.step(loss.item())
        losses.append(loss.item())
    return losses


def test_checkpoint_resume_is_exact(tmp_path):
    model, opt, sched, plateau = build()
    full = train(model, opt, sched, plateau, range(10))
    final = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    model, opt, sched, plateau = build()
    first = train(model, opt, sched, plateau, range(4))
    path = tmp_path / "ckpt.gd"
    gpudiff.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "plateau": plateau.state_dict(),
                  "step": 4}, path)
    del model, opt, sched, plateau

    model, opt, sched, plateau = build()  # fresh objects, different from the saved state
    ck = gpudiff.load(path)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    plateau.load_state_dict(ck["plateau"])
    rest = train(model, opt, sched, plateau, range(ck["step"], 10))
    assert first + rest == full
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), final[k], err_msg=k)
    assert int(model[1].num_batches_tracked) == 10
