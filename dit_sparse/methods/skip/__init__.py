"""The "skip" wrapper: a cross-step cache of key tiles whose attention mass stayed provably negligible.

`cache` holds the bound and the cache's data, `method` the wrapper, `calibration` the per-layer tolerance
file and `calibrate` the run that makes one. See docs/tile-skip.md.
"""

from .method import SkipCache, SkipConfig

__all__ = ["SkipCache", "SkipConfig"]
