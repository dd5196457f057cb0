"""gpudiff.utils: the data-loading stack (``gpudiff.utils.data``)."""
from . import data

__all__ = ["data"]
