"""Backend settings, in the manner of ``torch.backends``: ``gpudiff.backends.cuda``,
``gpudiff.backends.cudnn``, ``gpudiff.backends.mps``.

(The backend itself, the one place that knows NumPy from CuPy, is ``gpudiff.runtime``.)
"""
from . import cuda, cudnn, mps  # noqa: F401
