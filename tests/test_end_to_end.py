"""End to end: one PyTorch-style training script, run unchanged on gpudiff and on PyTorch.

``train_and_evaluate`` is written exactly as one would for PyTorch (Module subclass, conv,
dropout, max_pool2d, flatten, log_softmax + nll_loss, Adadelta + StepLR, train/eval,
no_grad, argmax/eq accuracy); it only receives the ``torch`` module as an argument. With
gpudiff injected it must reach >= 92% test accuracy on the shipped Digits set within a
minute on the CPU; with real PyTorch (and a TensorDataset of the same arrays) it must run
and learn too, which shows the script is genuine PyTorch code.
"""
import time

import numpy as np
import pytest
import torch as real_torch

import gpudiff
import gpudiff.nn
import gpudiff.nn.functional as F
import gpudiff.optim
import gpudiff.optim.lr_scheduler
import gpudiff.utils.data
from gpudiff.datasets import Digits

needs_cnn_ops = pytest.mark.skipif(
    not all(hasattr(F, n) for n in ("conv2d", "max_pool2d", "dropout")),
    reason="the CNN ops (F.conv2d, F.max_pool2d, F.dropout) are not available yet")


def train_and_evaluate(torch, train_loader, test_loader, epochs=12, seed=1):
    """A PyTorch training script; ``torch`` is either gpudiff or torch."""
    nn = torch.nn
    F = torch.nn.functional
    optim = torch.optim
    from_scheduler = torch.optim.lr_scheduler

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 1, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = (x - 0.3) / 0.4  # standardise the [0, 1] pixels (mean ~0.3, std ~0.4)
            x = self.conv1(x)
            x = F.relu(x)
            x = self.conv2(x)
            x = F.relu(x)
            x = F.max_pool2d(x, 2)
            x = self.dropout1(x)
            x = torch.flatten(x, 1)
            x = self.fc1(x)
            x = F.relu(x)
            x = self.dropout2(x)
            x = self.fc2(x)
            output = F.log_softmax(x, dim=1)
            return output

    torch.manual_seed(seed)
    device = torch.device("cpu")
    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = from_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    losses = []
    for epoch in range(1, epochs + 1):
        model.train()
        for data, target in train_loader:
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()

    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    n = len(test_loader.dataset)
    return {"test_loss": test_loss / n, "accuracy": correct / n, "losses": losses,
            "lr": scheduler.get_last_lr()[0]}


def _digits_arrays(train):
    ds = Digits(train=train)
    return (ds.data.astype(np.float32) / 16.0)[:, None], ds.targets.astype(np.int64)


@needs_cnn_ops
def test_script_trains_digits_on_gpudiff_and_runs_unchanged_on_pytorch():
    gen = gpudiff.Generator().manual_seed(0)
    train_loader = gpudiff.utils.data.DataLoader(Digits(train=True), batch_size=64,
                                                 shuffle=True, generator=gen)
    test_loader = gpudiff.utils.data.DataLoader(Digits(train=False), batch_size=128)
    t0 = time.perf_counter()
    ours = train_and_evaluate(gpudiff, train_loader, test_loader)
    elapsed = time.perf_counter() - t0
    assert ours["accuracy"] >= 0.92, ours["accuracy"]
    assert elapsed < 60.0, f"training took {elapsed:.1f} s"
    assert np.mean(ours["losses"][-10:]) < 0.5 * np.mean(ours["losses"][:5])
    assert abs(ours["lr"] - 0.9 ** 12) < 1e-12

    # the same function on real PyTorch, with a TensorDataset of the same arrays
    tu = real_torch.utils.data
    xtr, ytr = _digits_arrays(True)
    xte, yte = _digits_arrays(False)
    tg = real_torch.Generator().manual_seed(0)
    ref_train = tu.DataLoader(tu.TensorDataset(real_torch.tensor(xtr), real_torch.tensor(ytr)),
                              batch_size=64, shuffle=True, generator=tg)
    ref_test = tu.DataLoader(tu.TensorDataset(real_torch.tensor(xte), real_torch.tensor(yte)),
                             batch_size=128)
    ref = train_and_evaluate(real_torch, ref_train, ref_test)
    assert ref["accuracy"] >= 0.92, ref["accuracy"]
    assert ref["lr"] == ours["lr"]
    # both learn alike: the final test losses are of the same size
    assert ours["test_loss"] < 3 * ref["test_loss"] + 0.05


def test_digits_arrays_match_the_gpudiff_dataset():
    """The PyTorch half of the test sees exactly the images the gpudiff half sees."""
    x, y = _digits_arrays(False)
    ds = Digits(train=False)
    for i in (0, 17, 359):
        img, label = ds[i]
        np.testing.assert_array_equal(img.numpy(), x[i])
        assert label == y[i]
