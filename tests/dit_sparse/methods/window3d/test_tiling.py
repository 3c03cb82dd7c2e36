import pytest
import torch

from dit_sparse.layout import VideoLayout
from dit_sparse.methods.window3d.tiling import VideoTiling


def _check_tiling(layout: VideoLayout, tile, text_block=128):
    T = VideoTiling(layout, tile, text_block)
    S = layout.seq_len
    perm, inv = T.perm, T.inverse
    # Bijection: every original token appears exactly once, and inverse undoes it.
    assert torch.equal(torch.sort(perm).values, torch.arange(S))
    assert torch.equal(perm[inv], torch.arange(S)) and torch.equal(inv[perm], torch.arange(S))
    off = T.offsets_cpu.long()
    assert off[0] == 0 and off[-1] == S and bool((off[1:] >= off[:-1]).all())
    assert T.num_ranges == off.numel() - 1 == T.num_tiles + T.text_units
    # Each video range holds exactly the tokens of one tile, in frame-major order; brute force per token.
    f_, r_, c_ = tile
    coords = T.tile_coords()
    vs = layout.video_start
    for i in range(T.num_tiles):
        a, b, c = coords[i].tolist()
        lo, hi = int(off[T.video_unit_start + i]), int(off[T.video_unit_start + i + 1])
        got = perm[lo:hi]
        want = [vs + (f * layout.rows + r) * layout.cols + cc
                for f in range(a * f_, min((a + 1) * f_, layout.frames))
                for r in range(b * r_, min((b + 1) * r_, layout.rows))
                for cc in range(c * c_, min((c + 1) * c_, layout.cols))]
        assert got.tolist() == want
    # Text ranges: text tokens in order, each range at most text_block long.
    text_ids = []
    for j in range(T.text_units):
        idx = j if layout.text_first else T.num_tiles + j
        lo, hi = int(off[idx]), int(off[idx + 1])
        assert 0 < hi - lo <= text_block
        text_ids += perm[lo:hi].tolist()
    assert text_ids == list(range(layout.text_start, layout.text_start + layout.text_tokens))
    # range_of_token agrees with the offsets.
    pos_range = torch.searchsorted(off[1:], torch.arange(S), right=True)
    assert torch.equal(T.range_of_token, pos_range[inv])
    return T


@pytest.mark.parametrize("text,first", [(0, False), (5, True), (130, False), (131, True)])
def test_ragged_tiling_is_exact_bijection(text, first):
    T = _check_tiling(VideoLayout(3, 7, 11, text, first), (2, 4, 4), text_block=64)
    assert T.grid == (2, 2, 3)
    assert T.extents[0].tolist() == [2, 1] and T.extents[2].tolist() == [4, 4, 3]


@pytest.mark.parametrize("tile", [(1, 8, 8), (2, 8, 8), (1, 8, 16), (4, 4, 8), (1, 1, 1), (9, 9, 9)])
def test_other_tiles_and_shapes(tile):
    _check_tiling(VideoLayout(5, 9, 13, 3, False), tile, text_block=2)


def test_wan_480p_grid_ranges():
    T = VideoTiling(VideoLayout(21, 30, 52), (1, 8, 8))
    assert T.grid == (21, 4, 7) and T.num_ranges == 588
    sizes = (T.offsets_cpu[1:] - T.offsets_cpu[:-1]).unique().tolist()
    assert sorted(sizes) == [24, 32, 48, 64]
    assert int(T.offsets_cpu[-1]) == 32760


def test_physical_permutation_roundtrip():
    L = VideoLayout(3, 7, 11, 4, True)
    a = VideoTiling(L, (2, 4, 4))
    x = torch.randn(2, L.seq_len, 3, 5)
    y = a.permute(x, dim=1)
    assert torch.equal(y[:, 0], x[:, int(a.perm[0])])
    assert torch.equal(a.unpermute(y, dim=1), x)


def test_bad_tile_raises():
    with pytest.raises(ValueError, match="tile"):
        VideoTiling(VideoLayout(2, 2, 2), (0, 2, 2))
    with pytest.raises(ValueError, match="tile"):
        VideoTiling(VideoLayout(2, 2, 2), (2, 2))
