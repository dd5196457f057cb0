"""Extract the 8x8 UCI optical digits that scikit-learn bundles into gpudiff's shipped file.

Run once, by hand, where scikit-learn is installed (gpudiff never needs it at run time):

    python tools/make_digits.py            # writes gpudiff/datasets/data/digits.npz

The file holds ``images``: uint8 (1797, 8, 8), pixels 0..16 (counts of "on" pixels in 4x4
blocks of the original 32x32 bitmaps), and ``labels``: uint8 (1797,), digits 0..9, in
scikit-learn's order (the order of UCI's optdigits.tes). Origin and license:
gpudiff/datasets/data/README.md.
"""
import hashlib
import os

import numpy as np
from sklearn.datasets import load_digits

OUT = os.path.join(os.path.dirname(__file__), "..", "gpudiff", "datasets", "data", "digits.npz")


def main():
    bunch = load_digits()
    pixels = bunch.data                                   # (1797, 64) float64, integral
    assert pixels.shape == (1797, 64)
    assert np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 16
    images = pixels.astype(np.uint8).reshape(-1, 8, 8)    # row-major 8x8, as bunch.images
    assert np.array_equal(images, bunch.images.astype(np.uint8))
    labels = bunch.target.astype(np.uint8)
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    np.savez_compressed(OUT, images=images, labels=labels)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes), "
          f"sha256(images + labels) = {digest}")


if __name__ == "__main__":
    main()
