"""CubistMerge inside attention windows: cubist_merge_windows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge import cubist_merge
from cubistmerge.merge.windows import cubist_merge_windows, merge_apply_unmerge_in_windows, window_reduction


def _members(recover_index: torch.Tensor, W: int) -> dict[int, list[tuple[int, int]]]:
    groups: dict[int, list[tuple[int, int]]] = {}
    for flat, slot in enumerate(recover_index.tolist()):
        groups.setdefault(slot, []).append(divmod(flat, W))
    return groups


@settings(max_examples=40, deadline=None)
@given(
    H=st.integers(2, 23),
    W=st.integers(2, 23),
    window=st.integers(2, 9),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_windows_never_mix_and_keep_their_layout(H, W, window, data, seed):
    r_h = data.draw(st.integers(0, window // 2))
    r_w = data.draw(st.integers(0, window // 2))
    x = torch.randn(2, H, W, 3, generator=torch.Generator().manual_seed(seed))
    merged, recover, new_window = cubist_merge_windows(x, window, r_h, r_w)
    Hm, Wm = recover.merged_grid
    assert merged.shape == (2, Hm, Wm, 3)
    assert new_window == (window - r_h, window - r_w)
    full_h, rest_h = divmod(H, window)
    full_w, rest_w = divmod(W, window)
    assert Hm == full_h * (window - r_h) + rest_h - window_reduction(rest_h, r_h)
    assert Wm == full_w * (window - r_w) + rest_w - window_reduction(rest_w, r_w)
    assert recover(merged).shape == x.shape
    for b in range(2):
        for slot, members in _members(recover.index[b], W).items():
            windows = {(h // window, w // window) for h, w in members}
            assert len(windows) == 1, f"slot {slot} mixes windows {windows}"
            # The merged grid, tiled with the reduced window size, puts the slot in the same window.
            h_m, w_m = divmod(slot, Wm)
            assert (h_m // new_window[0], w_m // new_window[1]) == windows.pop()
        assert len(set(recover.index[b].tolist())) == Hm * Wm


def test_full_windows_equal_merging_each_window_alone():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 8, 5)
    merged, recover, _ = cubist_merge_windows(x, 4, 1, 2)
    assert merged.shape == (2, 9, 4, 5)
    for b in range(2):
        for i in range(3):
            for j in range(2):
                alone, _ = cubist_merge(x[b : b + 1, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4], 1, 2)
                assert torch.equal(merged[b, 3 * i : 3 * i + 3, 2 * j : 2 * j + 2], alone[0])


def test_sam_layout_64_grid_with_14_windows():
    """SAM-B at 1024 px: a 64x64 grid in 14x14 windows, the last row/column of windows 8 tokens deep."""
    x = torch.randn(1, 64, 64, 4)
    merged, recover, window = cubist_merge_windows(x, 14, 2, 2)
    assert window == (12, 12)
    assert merged.shape == (1, 4 * 12 + 6, 4 * 12 + 6, 4)
    assert recover(merged).shape == x.shape


def test_edge_windows_contain_only_real_tokens():
    """A window holding 1 real row cannot lose a row; it is never padded to be merged."""
    x = torch.randn(1, 9, 9, 2)
    merged, recover, _ = cubist_merge_windows(x, 4, 2, 2)
    assert merged.shape == (1, 2 + 2 + 1, 5, 2)
    assert torch.equal(recover(merged)[0, 8, 8], x[0, 8, 8])  # the 1x1 corner window is unchanged


def test_inputs_unchanged_and_gradients():
    x = torch.randn(1, 10, 10, 3, requires_grad=True)
    before = x.detach().clone()
    merged, recover, _ = cubist_merge_windows(x, (4, 5), 1, 2)
    recover(merged).sum().backward()
    assert torch.equal(x.detach(), before) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("window,r_h,r_w,message", [
    (4, 3, 0, "allowed 0 to 2"),
    ((4, 6), 0, 4, "allowed 0 to 3"),
    (0, 0, 0, "window size must be positive"),
])
def test_errors(window, r_h, r_w, message):
    with pytest.raises(ValueError, match=message):
        cubist_merge_windows(torch.randn(1, 8, 8, 2), window, r_h, r_w)


def test_not_a_grid():
    with pytest.raises(ValueError, match="4-D grid"):
        cubist_merge_windows(torch.randn(8, 8, 2), 4, 1, 1)


def test_merge_apply_unmerge_in_windows():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 10, 3)
    double = lambda t: 2 * t  # noqa: E731
    assert torch.allclose(merge_apply_unmerge_in_windows(x, 4, 0, double), 2 * x)
    out = merge_apply_unmerge_in_windows(x, 4, 8, lambda t: t)  # identity: each token gets its group's mean
    assert out.shape == x.shape
    changed = (out - x).abs().amax(-1) > 1e-6
    # Full 4x4 windows lose 8 of 16 tokens: at least 8 per window differ from their input.
    assert changed[:, :4, :4].sum(dim=(1, 2)).min() >= 8
    # Each group of s tokens gives back s copies of its mean: a window's sum is kept exactly when
    # groups never leave their window (and would change if a group mixed two windows).
    for h0 in range(0, 9, 4):
        for w0 in range(0, 10, 4):
            window_in, window_out = x[:, h0 : h0 + 4, w0 : w0 + 4], out[:, h0 : h0 + 4, w0 : w0 + 4]
            assert torch.allclose(window_in.sum(dim=(1, 2)), window_out.sum(dim=(1, 2)), atol=1e-5)
    with pytest.raises(ValueError, match="allowed 0 to 8"):
        merge_apply_unmerge_in_windows(x, 4, 9, double)
