"""The "window3d" method: per-head 3D tile windows over the video grid.

`tiling` cuts the grid into tiles (the token order plans run in), `patterns` holds the window shapes and
their exact densities, `plans` turns per-head patterns into block plans, `head_search` scores patterns
against exact attention (online choice, head_config files) and `search` runs the offline search.
"""

from .method import Window3D, Window3DConfig
from .patterns import TilePattern

__all__ = ["TilePattern", "Window3D", "Window3DConfig"]
