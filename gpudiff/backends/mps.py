"""``gpudiff.backends.mps``: Apple's Metal backend, which gpudiff does not have (PyTorch's
MNIST example asks before it picks a device)."""


def is_available():
    return False


def is_built():
    return False
