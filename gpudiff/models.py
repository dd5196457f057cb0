"""The model zoo behind ``gpudiff train --model``: three classic image classifiers.

Every model takes NCHW float32 images of ``in_channels`` x ``image_size`` x ``image_size``
(1x8x8 Digits, 1x28x28 MNIST / Fashion-MNIST, 3x32x32 CIFAR-10, or any square size the layers
fit) and returns (N, num_classes) logits (no softmax: use ``F.cross_entropy``).

- ``lenet``: LeNet-5 as LeCun et al. (1998) drew it, sigmoid activations and 2x2 average
  pooling (the "subsampling" layers): conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> fc 120 ->
  fc 84 -> fc 10. 28x28 inputs are padded by 2 (the paper's 32x32 frame); inputs under 16
  pixels use 3x3 convolutions with padding 1, so an 8x8 digit keeps a 2x2 map at the end.
- ``mnist-cnn``: the network of PyTorch's examples/mnist: conv 32@3x3 -> relu -> conv 64@3x3
  -> relu -> maxpool 2 -> dropout .25 -> fc 128 -> relu -> dropout .5 -> fc 10; the first
  fc layer's input size follows the image size (9216 for 28x28).
- ``resnet-small``: a CIFAR ResNet (He et al. 2016, section 4.2) with ``blocks`` basic blocks
  per stage (1 by default: ResNet-8): conv 16@3x3 -> 3 stages of 16/32/64 channels (stride 2
  between stages) -> global average pool -> fc. BatchNorm after every convolution; the
  shortcut is a 1x1 convolution + BatchNorm where the shape changes.

>>> import gpudiff
>>> model = create_model("lenet", in_channels=1, image_size=8)
>>> model(gpudiff.zeros(2, 1, 8, 8)).shape
(2, 10)
"""
import importlib

from . import nn as _nn

__all__ = ["MODELS", "BasicBlock", "LeNet5", "MnistNet", "ResNetSmall", "TinyMLP", "create_model",
           "zoo"]
MODELS = ("lenet", "mnist-cnn", "resnet-small", "tiny-mlp")


def _conv_out(size, kernel, padding=0, stride=1):
    """Spatial size after a convolution or pooling window."""
    return (size + 2 * padding - kernel) // stride + 1


def zoo(nn):
    """The model classes written against ``nn``: gpudiff.nn, or torch.nn (the same API), so
    the benchmark and the tests can build the very same network in PyTorch.

    Returns {"lenet": LeNet5, "mnist-cnn": MnistNet, "resnet-small": ResNetSmall,
    "tiny-mlp": TinyMLP, "BasicBlock": BasicBlock}.
    """
    key = nn.__name__
    if key in _ZOOS:
        return _ZOOS[key]
    F = importlib.import_module(nn.__name__ + ".functional")

    class LeNet5(nn.Module):
        """LeNet-5 with sigmoid activations and average pooling (see the module docstring)."""

        def __init__(self, in_channels=1, num_classes=10, image_size=28):
            super().__init__()
            if image_size >= 16:
                # 5x5 kernels as in the paper; pad small images up to the paper's 32x32 frame
                k, pad1, pad2 = 5, max(0, (32 - image_size) // 2), 0
            else:
                # tiny images (8x8 Digits): size-keeping 3x3 kernels; two pools leave 2x2
                k, pad1, pad2 = 3, 1, 1
            s = _conv_out(image_size, k, pad1) // 2      # after conv1 + pool
            s = _conv_out(s, k, pad2) // 2               # after conv2 + pool
            if s < 1:
                raise ValueError(f"LeNet5: a {image_size}x{image_size} image is too small")
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, 6, k, padding=pad1), nn.Sigmoid(),
                nn.AvgPool2d(2, 2),
                nn.Conv2d(6, 16, k, padding=pad2), nn.Sigmoid(),
                nn.AvgPool2d(2, 2),
            )
            self.classifier = nn.Sequential(
                nn.Flatten(),                            # (N, 16 * s * s)
                nn.Linear(16 * s * s, 120), nn.Sigmoid(),
                nn.Linear(120, 84), nn.Sigmoid(),
                nn.Linear(84, num_classes),
            )

        def forward(self, x):
            return self.classifier(self.features(x))

    class MnistNet(nn.Module):
        """The CNN of PyTorch's examples/mnist/main.py, returning logits (module docstring)."""

        def __init__(self, in_channels=1, num_classes=10, image_size=28):
            super().__init__()
            s = _conv_out(_conv_out(image_size, 3), 3) // 2   # two valid 3x3 convs, one 2x2 pool
            if s < 1:
                raise ValueError(f"MnistNet: a {image_size}x{image_size} image is too small")
            self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(64 * s * s, 128)            # 9216 for 28x28 images
            self.fc2 = nn.Linear(128, num_classes)

        def forward(self, x):
            x = F.relu(self.conv1(x))                         # (N, 32, H-2, W-2)
            x = F.relu(self.conv2(x))                         # (N, 64, H-4, W-4)
            x = F.max_pool2d(x, 2)                            # (N, 64, s, s)
            x = self.dropout1(x)
            x = x.flatten(1)                                  # (N, 64 * s * s)
            x = F.relu(self.fc1(x))
            x = self.dropout2(x)
            return self.fc2(x)


    class BasicBlock(nn.Module):
        """Two 3x3 conv-BN layers and a shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + sc(x))."""

        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            if stride != 1 or in_planes != planes:
                # projection shortcut (option B of the paper) where the shape changes
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes))
            else:
                self.shortcut = nn.Identity()

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))


    class ResNetSmall(nn.Module):
        """A CIFAR-style ResNet with 6 * blocks + 2 layers (ResNet-8 by default)."""

        def __init__(self, in_channels=3, num_classes=10, image_size=32, blocks=1, width=16):
            super().__init__()
            if image_size < 4:
                raise ValueError(f"ResNetSmall: a {image_size}x{image_size} image is too small")
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            layers, in_planes = [], width
            for stage, planes in enumerate((width, 2 * width, 4 * width)):
                for b in range(blocks):
                    stride = 2 if (stage > 0 and b == 0) else 1    # halve H, W between stages
                    layers.append(BasicBlock(in_planes, planes, stride))
                    in_planes = planes
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(in_planes, num_classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))               # (N, 16, H, W)
            x = self.layers(x)                                # (N, 64, H/4, W/4)
            x = self.pool(x).flatten(1)                       # (N, 64)
            return self.fc(x)

    class TinyMLP(nn.Module):
        """Flatten, Linear(in, 8), depth x (Linear 8->8, Tanh), Linear(8, classes): a network
        of many small ops, where the per-op cost of the framework is most of the step."""

        def __init__(self, in_channels=1, num_classes=10, image_size=8, depth=6, width=8):
            super().__init__()
            layers = [nn.Flatten(), nn.Linear(in_channels * image_size * image_size, width)]
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.Tanh()]
            layers.append(nn.Linear(width, num_classes))
            self.net = nn.Sequential(*layers)

        def forward(self, x):
            return self.net(x)

    classes = {"lenet": LeNet5, "mnist-cnn": MnistNet, "resnet-small": ResNetSmall,
               "tiny-mlp": TinyMLP, "BasicBlock": BasicBlock}
    for cls in classes.values():      # name them as if defined at module level
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    _ZOOS[key] = classes
    return classes


_ZOOS = {}


def create_model(name, in_channels=1, image_size=28, num_classes=10, nn=None, **kwargs):
    """Build the zoo model ``name`` ('lenet', 'mnist-cnn', 'resnet-small' or 'tiny-mlp') for the
    given input.

    nn: the framework's nn package (default gpudiff.nn; torch.nn builds the PyTorch twin).
    kwargs: passed on to the class (``blocks=3`` makes resnet-small a ResNet-20).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    cls = zoo(_nn if nn is None else nn)[name]
    return cls(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
               **kwargs)


# the gpudiff classes
_classes = zoo(_nn)
LeNet5 = _classes["lenet"]
MnistNet = _classes["mnist-cnn"]
ResNetSmall = _classes["resnet-small"]
BasicBlock = _classes["BasicBlock"]
TinyMLP = _classes["tiny-mlp"]
