"""The layer classes of gpudiff.nn, one file per group as in PyTorch."""
from .module import Module
from .container import Sequential, ModuleList, ModuleDict, ParameterList, ParameterDict
from .linear import Identity, Linear, Bilinear
from .conv import Conv2d, ConvTranspose2d
from .pooling import MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d
from .batchnorm import BatchNorm1d, BatchNorm2d
from .normalization import LayerNorm
from .dropout import Dropout, Dropout2d
from .flatten import Flatten, Unflatten
from .sparse import Embedding
from .activation import (ReLU, LeakyReLU, ELU, GELU, SiLU, Sigmoid, Tanh, Softmax, LogSoftmax,
                         Softmin, LogSigmoid, Softplus, Hardtanh, ReLU6)
from .loss import (L1Loss, MSELoss, SmoothL1Loss, HuberLoss, NLLLoss, CrossEntropyLoss,
                   BCELoss, BCEWithLogitsLoss, MultiMarginLoss, KLDivLoss)

__all__ = [
    "Module", "Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict",
    "Identity", "Linear", "Bilinear", "Conv2d", "ConvTranspose2d", "MaxPool2d", "AvgPool2d",
    "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "BatchNorm1d", "BatchNorm2d", "LayerNorm",
    "Dropout", "Dropout2d", "Flatten", "Unflatten", "Embedding", "ReLU", "LeakyReLU", "ELU",
    "GELU", "SiLU", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Softmin", "LogSigmoid",
    "Softplus", "Hardtanh", "ReLU6", "L1Loss", "MSELoss", "SmoothL1Loss", "HuberLoss",
    "NLLLoss", "CrossEntropyLoss", "BCELoss", "BCEWithLogitsLoss", "MultiMarginLoss",
    "KLDivLoss",
]
