"""gpudiff.nn: Module, layers, losses, containers, init and utils (PyTorch's names).

>>> import gpudiff.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> model(gpudiff.randn(3, 4)).shape
(3, 2)
"""
from . import functional, init, parallel, utils
from .modules import *
from .modules import __all__ as _modules_all
from .parameter import Buffer, Parameter

__all__ = ["Parameter", "Buffer", "functional", "init", "utils"] + list(_modules_all)
