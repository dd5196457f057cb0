"""The layer classes of gpudiff.nn, one file per group as in PyTorch."""
from .activation import (
                         ELU,
                         GELU,
                         Hardtanh,
                         LeakyReLU,
                         LogSigmoid,
                         LogSoftmax,
                         ReLU,
                         ReLU6,
                         Sigmoid,
                         SiLU,
                         Softmax,
                         Softmin,
                         Softplus,
                         Tanh,
)
from .batchnorm import BatchNorm1d, BatchNorm2d
from .container import ModuleDict, ModuleList, ParameterDict, ParameterList, Sequential
from .conv import Conv2d, ConvTranspose2d
from .dropout import Dropout, Dropout2d
from .flatten import Flatten, Unflatten
from .linear import Bilinear, Identity, Linear
from .loss import (
                         BCELoss,
                         BCEWithLogitsLoss,
                         CrossEntropyLoss,
                         HuberLoss,
                         KLDivLoss,
                         L1Loss,
                         MSELoss,
                         MultiMarginLoss,
                         NLLLoss,
                         SmoothL1Loss,
)
from .module import Module
from .normalization import LayerNorm
from .pooling import AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, MaxPool2d
from .sparse import Embedding
from .sync_batchnorm import SyncBatchNorm

__all__ = [
                         "ELU",
                         "GELU",
                         "AdaptiveAvgPool2d",
                         "AdaptiveMaxPool2d",
                         "AvgPool2d",
                         "BCELoss",
                         "BCEWithLogitsLoss",
                         "BatchNorm1d",
                         "BatchNorm2d",
                         "SyncBatchNorm",
                         "Bilinear",
                         "Conv2d",
                         "ConvTranspose2d",
                         "CrossEntropyLoss",
                         "Dropout",
                         "Dropout2d",
                         "Embedding",
                         "Flatten",
                         "Hardtanh",
                         "HuberLoss",
                         "Identity",
                         "KLDivLoss",
                         "L1Loss",
                         "LayerNorm",
                         "LeakyReLU",
                         "Linear",
                         "LogSigmoid",
                         "LogSoftmax",
                         "MSELoss",
                         "MaxPool2d",
                         "Module",
                         "ModuleDict",
                         "ModuleList",
                         "MultiMarginLoss",
                         "NLLLoss",
                         "ParameterDict",
                         "ParameterList",
                         "ReLU",
                         "ReLU6",
                         "Sequential",
                         "SiLU",
                         "Sigmoid",
                         "SmoothL1Loss",
                         "Softmax",
                         "Softmin",
                         "Softplus",
                         "Tanh",
                         "Unflatten",
]
