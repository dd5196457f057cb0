"""The model zoo (gpudiff.models) against the same networks built on torch.nn.

Each model is built twice from one definition (gpudiff.nn and torch.nn), given the same
weights, and must agree on the logits, the loss gradient of every parameter and, for
BatchNorm, the running statistics: this checks both the zoo and the layers under it.
"""
import numpy as np
import pytest

import gpudiff
import gpudiff.nn.functional as F
from gpudiff.models import MODELS, BasicBlock, LeNet5, MnistNet, ResNetSmall, create_model

torch = pytest.importorskip("torch")

SHAPES = [(1, 8), (1, 28), (3, 32)]   # Digits, MNIST, CIFAR-10


def _twins(name, c, s):
    gpudiff.manual_seed(0)
    g = create_model(name, c, s)
    t = create_model(name, c, s, nn=torch.nn)
    g.load_state_dict({k: gpudiff.tensor(v.detach().numpy()) for k, v in t.state_dict().items()})
    return g, t


@pytest.mark.parametrize("c, s", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_same_as_torch(name, c, s):
    g, t = _twins(name, c, s)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, c, s, s)).astype(np.float32)
    y = rng.integers(0, 10, 4)
    # eval mode: no dropout, BatchNorm on running statistics
    g.eval()
    t.eval()
    with gpudiff.no_grad(), torch.no_grad():
        np.testing.assert_allclose(g(gpudiff.tensor(x)).numpy(), t(torch.from_numpy(x)).numpy(),
                                   rtol=1e-4, atol=1e-5)
    if name == "mnist-cnn":   # dropout draws differ between the frameworks
        return
    g.train()
    t.train()
    lg = F.cross_entropy(g(gpudiff.tensor(x)), gpudiff.tensor(y))
    lt = torch.nn.functional.cross_entropy(t(torch.from_numpy(x)), torch.from_numpy(y))
    lg.backward()
    lt.backward()
    assert lg.item() == pytest.approx(lt.item(), rel=1e-4)
    tp = dict(t.named_parameters())
    for k, p in g.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), tp[k].grad.numpy(), rtol=1e-3, atol=1e-5,
                                   err_msg=k)
    tb = dict(t.named_buffers())
    for k, b in g.named_buffers():   # BatchNorm running_mean / running_var / num_batches
        np.testing.assert_allclose(b.numpy(), tb[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_architectures():
    # LeNet-5: the paper's layer sizes at 28x28 (400 features into fc 120)
    lenet = LeNet5(1, 10, 28)
    assert lenet.classifier[1].in_features == 16 * 5 * 5
    assert [type(m).__name__ for m in lenet.features] == [
        "Conv2d", "Sigmoid", "AvgPool2d", "Conv2d", "Sigmoid", "AvgPool2d"]
    assert LeNet5(1, 10, 8).classifier[1].in_features == 16 * 2 * 2
    # PyTorch's MNIST example: fc1 has 9216 inputs at 28x28
    assert MnistNet(1, 10, 28).fc1.in_features == 9216
    assert MnistNet(1, 10, 28).conv1.out_channels == 32
    # ResNet-8 (one block per stage); blocks=3 is ResNet-20 with 20 weight layers
    r = ResNetSmall(3, 10, 32)
    assert sum(isinstance(m, BasicBlock) for m in r.modules()) == 3
    r20 = create_model("resnet-small", 3, 32, blocks=3)
    convs = [m for m in r20.modules() if isinstance(m, gpudiff.nn.Conv2d)
             and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20        # 19 3x3 convolutions + the fc layer
    assert create_model("lenet", 1, 8)(gpudiff.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg")
    with pytest.raises(ValueError, match="too small"):
        MnistNet(1, 10, 4)
