"""gpudiff.datasets: Digits (shipped with the package), MNIST, FashionMNIST and CIFAR10 (read
from the standard files on disk; nothing is ever downloaded), and image transforms."""
from . import transforms
from .cifar import CIFAR10
from .digits import Digits
from .mnist import MNIST, FashionMNIST
from .vision import VisionDataset

__all__ = ["CIFAR10", "MNIST", "Digits", "FashionMNIST", "VisionDataset", "transforms"]
