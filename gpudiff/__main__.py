"""``python -m gpudiff train ...`` / ``python -m gpudiff bench ...``: the same as the ``gpudiff``
console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
