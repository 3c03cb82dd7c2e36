"""Writing videos safely: check the destination first, never leave a partial file behind."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np


class OutputPathError(OSError):
    """The output path cannot be written; the message says why and what to do."""


VIDEO_EXTENSIONS = (".mp4", ".gif")  # what `write_video` can encode


def check_video_path(path: str | Path) -> Path:
    """Return `path` as a Path if `write_video` can write it (a .mp4 or .gif name in a writable folder),
    else raise OutputPathError. Meant to run before any generation, so a bad --out costs nothing."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_EXTENSIONS and not path.is_dir():
        accepted = " or ".join(VIDEO_EXTENSIONS)
        given = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise OutputPathError(f"output video {path} has {given}; use a name ending in {accepted}, "
                              f"e.g. {path.with_suffix('.mp4')}")
    return check_writable(path)


def check_writable(path: str | Path) -> Path:
    """Return `path` as a Path if its folder exists (or can be created) and is writable, else raise."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"output path {path} is a folder; give a file name such as {path / 'video.mp4'}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create the folder {parent} for {path}: {exc.strerror}; choose another --out") from exc
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"folder {parent} is not writable; choose another --out")
    return path


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write [F, H, W, 3] frames in [0, 1] as mp4 (imageio-ffmpeg) or gif; atomically. Returns the path."""
    path = check_video_path(path)
    data = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            path = path.with_suffix(".gif")
            suffix = ".gif"
            warnings.warn("imageio-ffmpeg is not installed: writing a GIF instead of MP4", stacklevel=2)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        import imageio.v2 as imageio

        if suffix == ".mp4":
            # macro_block_size=1 keeps tiny frames (e.g. 64x64) at their size.
            imageio.mimsave(tmp, list(data), fps=fps, format="FFMPEG", macro_block_size=1)
        elif suffix == ".gif":
            imageio.mimsave(tmp, list(data), duration=1000 / fps, loop=0)
        else:  # unreachable: check_video_path accepted only VIDEO_EXTENSIONS
            raise OutputPathError(f"unsupported video extension {suffix!r}; use {' or '.join(VIDEO_EXTENSIONS)}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
