"""`VideoLayout`: where video and text tokens sit in an attention sequence."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoLayout:
    """Token grid of one attention call.

    Video tokens are flattened frame-major (frame, then row, then column, columns fastest), the layout
    every supported Diffusers DiT uses. In joint-attention models the text tokens are contiguous, either
    before (`text_first=True`, e.g. CogVideoX, Flux) or after (HunyuanVideo) the video tokens.
    """

    frames: int
    rows: int
    cols: int
    text_tokens: int = 0
    text_first: bool = False

    def __post_init__(self) -> None:
        if min(self.frames, self.rows, self.cols) < 1 or self.text_tokens < 0:
            raise ValueError(f"invalid layout {self}")

    @property
    def video_tokens(self) -> int:
        return self.frames * self.rows * self.cols

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        return self.text_tokens if self.text_first else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_first else self.video_tokens

    def with_text(self, seq_len: int, text_first: bool | None = None) -> VideoLayout:
        """This grid with as many text tokens as make up `seq_len` (joint attention)."""
        text = seq_len - self.video_tokens
        if text < 0:
            raise ValueError(f"sequence of {seq_len} tokens is shorter than the {self.video_tokens} video tokens")
        first = self.text_first if text_first is None else text_first
        return VideoLayout(self.frames, self.rows, self.cols, text, first)
