"""Where the data stack gets its randomness: one small place to switch later.

Everything random in gpudiff.utils.data and gpudiff.datasets.transforms (shuffling,
random_split, random crops and flips, worker seeds) goes through the functions here, so
``gpudiff.manual_seed(s)`` makes it reproducible and a future ``gpudiff.Generator`` only
needs a branch in :func:`numpy_rng`.

- :func:`global_seed` draws a fresh 63-bit seed from gpudiff's global RNG (the one
  ``gpudiff.manual_seed`` seeds), so that a generator-less DataLoader shuffles differently
  each epoch yet reproducibly after ``manual_seed``, as PyTorch's does.
- :func:`numpy_rng` turns a user's ``generator=`` argument into a ``numpy.random.Generator``.
- :func:`randint` / :func:`random` are scalar draws from the global RNG (for transforms).
- :func:`seed_all` re-seeds every RNG a worker process may use (gpudiff, numpy, random).
"""
import random as _pyrandom

import numpy as np

from .. import runtime

_SEED_HIGH = 2 ** 63 - 1


def _global_rng():
    """gpudiff's global numpy Generator (the one ``gpudiff.manual_seed`` seeds)."""
    return runtime.rng()


def randint(low, high):
    """One int in [low, high) from gpudiff's global RNG."""
    if high - low <= 1:
        return int(low)
    return int(_global_rng().integers(low, high))


def random():
    """One float in [0, 1) from gpudiff's global RNG."""
    return float(_global_rng().random())


def global_seed():
    """A fresh seed in [0, 2**63 - 1) drawn from gpudiff's global RNG."""
    return randint(0, _SEED_HIGH)


# Generator-like objects without a numpy Generator inside (a torch.Generator, say) are used
# through their seed: one use seeds a numpy stream with ``initial_seed()`` and then re-seeds
# the object from that stream, so the object advances like a generator (the next epoch
# differs) and ``g.manual_seed(s)`` restarts it.


def numpy_rng(generator=None):
    """A ``numpy.random.Generator`` for ``generator``.

    generator: None (a fresh stream seeded from gpudiff's global RNG), an int seed, a numpy
    ``Generator``/``RandomState``/``SeedSequence``, or any object that exposes a numpy
    Generator (attribute ``numpy_generator``/``rng``/``_rng``/``generator``) or a seed
    (``initial_seed()``, as torch.Generator and gpudiff.Generator have).
    """
    if generator is None:
        return np.random.default_rng(global_seed())
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, (bool, np.bool_)):
        raise TypeError("generator must be a Generator or an int seed, not a bool")
    if isinstance(generator, (int, np.integer)):
        return np.random.default_rng(int(generator))
    if isinstance(generator, np.random.RandomState):
        # draw a seed from it, so the RandomState advances like a generator would
        return np.random.default_rng(int(generator.randint(0, 2 ** 62)))
    if isinstance(generator, np.random.SeedSequence):
        return np.random.default_rng(generator)
    for name in ("numpy_generator", "rng", "_rng", "generator"):
        inner = getattr(generator, name, None)
        if callable(inner) and name == "numpy_generator":
            inner = inner()
        if isinstance(inner, np.random.Generator):
            return inner
    seed_fn = getattr(generator, "initial_seed", None)
    if callable(seed_fn) and seed_fn() is not None:
        rng = np.random.default_rng(int(seed_fn()))
        reseed = getattr(generator, "manual_seed", None)
        if callable(reseed):
            reseed(int(rng.integers(0, _SEED_HIGH)))
        return rng
    raise TypeError(
        f"generator must be None, an int seed, a numpy.random.Generator or an object with "
        f"initial_seed(); got {type(generator).__name__}")


def seed_all(seed):
    """Seed gpudiff's global RNG, numpy's legacy global RNG and Python's ``random``.

    Used at the start of each DataLoader worker so workers do not share one random stream
    (forked processes inherit identical RNG state: the classic duplicated-augmentation bug).
    """
    seed = int(seed)
    runtime.manual_seed(seed % 2 ** 32)   # within every RNG's seed range; workers stay distinct
    np.random.seed(seed % 2 ** 32)
    _pyrandom.seed(seed)
