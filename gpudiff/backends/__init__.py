"""Backend settings, in the manner of ``torch.backends``: ``gpudiff.backends.cuda``.

(The backend itself, the one place that knows NumPy from CuPy, is ``gpudiff.runtime``.)
"""
from . import cuda  # noqa: F401
