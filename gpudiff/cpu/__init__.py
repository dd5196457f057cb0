"""gpudiff.cpu: PyTorch's ``torch.cpu`` namespace, for ``torch.cpu.amp.autocast``."""
from . import amp  # noqa: F401


def is_available():
    return True


def device_count():
    return 1


def synchronize(device=None):
    """CPU work runs in order: nothing to wait for."""


__all__ = ["amp", "is_available", "device_count", "synchronize"]
