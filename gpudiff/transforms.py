"""``gpudiff.transforms``: the image transforms of gpudiff.datasets.transforms, under the
short name (``import gpudiff.transforms as T``)."""
from .datasets.transforms import *
from .datasets.transforms import __all__  # noqa: F401
