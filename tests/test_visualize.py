"""cubistmerge.visualize: merge groups from traced models, their drawing, and the PNG of several methods."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import cubistmerge
from cubistmerge.patch import UnsupportedModelError
from cubistmerge.patch import _after_attention as after_attention
from cubistmerge.visualize import (
    describe,
    group_colour_image,
    group_stats,
    merge_groups_of,
    merged_grid_of,
    visualize_methods,
)

# Tiny ViTs on a few CPU cores: 64 px images give a 4x4 patch grid, 128 px an 8x8 one.
SMALL = dict(img_size=128, depth=3)
TINY_NAME = "vit_tiny_patch16_224"

_MODELS: dict[tuple, nn.Module] = {}


def small_vit(**overrides) -> nn.Module:
    """A cached random-weight tiny ViT (tests patch a deep copy, or unpatch it again)."""
    key = tuple(sorted({**SMALL, **overrides}.items()))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = timm.create_model(TINY_NAME, pretrained=False, **dict(key)).eval()
    return _MODELS[key]


def patched(method: str, **options) -> nn.Module:
    return cubistmerge.patch(copy.deepcopy(small_vit()), method, trace_source=True, **options)


def noise_image(seed: int, size: int = 128) -> torch.Tensor:
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


def smooth_picture(size: int = 96) -> np.ndarray:
    """An (H, W, 3) uint8 picture with plain areas and edges, so merges have something to follow."""
    y, x = np.mgrid[0:size, 0:size] / size
    picture = np.stack([255 * x, 255 * y, 255 * (x > 0.5) * (y < 0.4)], axis=-1)
    return picture.round().astype(np.uint8)


# --------------------------------------------------------------------------- groups from a model


def unrecovered_count(method: str, image: torch.Tensor, **options) -> int:
    """Merged patch tokens at the end of the blocks, from the model's own output with recover_output=False."""
    model = patched(method, recover_output=False, **options)
    with torch.no_grad():
        out = model.forward_features(image.unsqueeze(0))
    return out.shape[1] - model.num_prefix_tokens


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("cubist", dict(r=(2, 3), loc=1)),
        ("cubist", dict(stages=[(0, 1, 2), (1, 2, 1)])),
        ("tome", dict(r=8)),
    ],
)
def test_one_group_per_patch_and_one_group_per_merged_token(method, options):
    image = noise_image(1)
    groups, grid = merge_groups_of(patched(method, **options), image)
    assert grid == (8, 8)
    assert groups.shape == (64,) and groups.dtype == torch.long
    count = unrecovered_count(method, image, **options)
    assert len(groups.unique()) == count < 64
    # Ids are the merged tokens' positions (prefix left out): exactly 0 .. count - 1.
    assert torch.equal(groups.unique(), torch.arange(count))


@pytest.mark.parametrize(("method", "options"), [("cubist", dict(r=(1, 2), loc=1)), ("tome", dict(r=3))])
def test_eva_models_give_groups_too(method, options):
    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=84, depth=3, embed_dim=64, num_heads=2)
    groups, grid = merge_groups_of(
        cubistmerge.patch(eva.eval(), method, trace_source=True, **options), noise_image(5, 84)
    )
    assert grid == (6, 6) and groups.shape == (36,)
    assert len(groups.unique()) == (5 * 4 if method == "cubist" else 36 - 3 * 3)


def test_tome_source_composes_every_block(monkeypatch):
    """The stored map is the composition of every block's merge, not the last block's alone."""
    recorded = []
    original = after_attention.match_bipartite

    def recording(metric, r, **kwargs):
        match = original(metric, r, **kwargs)
        recorded.append(match.index)
        return match

    monkeypatch.setattr(after_attention, "match_bipartite", recording)
    model = patched("tome", r=6)
    groups, _ = merge_groups_of(model, noise_image(2))
    assert len(recorded) == 3  # one merge per block
    composed = recorded[0]
    for index in recorded[1:]:
        composed = index.gather(1, composed)
    p = model.num_prefix_tokens
    assert torch.equal(model.cubistmerge_source, composed)
    assert torch.equal(groups, composed[0, p:] - p)
    assert len(groups.unique()) == 64 - 3 * 6


def check_single_pass_layout(groups: torch.Tensor, grid: tuple[int, int], r_h: int, r_w: int) -> None:
    """What one CubistMerge reduction guarantees about the group of every patch.

    The width pass merges neighbours inside every row; the height pass then
    merges neighbours inside every column of the width-merged grid.
    """
    H, W = grid
    Hm, Wm = H - r_h, W - r_w
    g = groups.reshape(H, W).numpy()
    assert len(np.unique(g)) == Hm * Wm
    row_of, col_of = g // Wm, g % Wm
    for h in range(H):
        # Along every row the merged column starts at 0, ends at W' - 1 and moves by 0 or 1: order kept.
        assert col_of[h, 0] == 0 and col_of[h, -1] == Wm - 1
        assert set(np.diff(col_of[h])) <= {0, 1}
    for c in range(Wm):
        merged_rows = []
        for h in range(H):
            run = np.flatnonzero(col_of[h] == c)
            # The patches of row h in merged column c are one width-merged token: a run of 1 to 3
            # neighbours that all land in the same merged row.
            assert 1 <= len(run) <= 3 and np.all(np.diff(run) == 1)
            assert len(set(row_of[h, run])) == 1
            merged_rows.append(row_of[h, run[0]])
        # Down every merged column the merged row starts at 0, ends at H' - 1 and moves by 0 or 1.
        assert merged_rows[0] == 0 and merged_rows[-1] == Hm - 1
        assert set(np.diff(merged_rows)) <= {0, 1}
    # So every group is a local blob: 1 to 3 consecutive rows, each a run of 1 to 3 neighbours.
    for k in np.unique(g):
        rows = np.flatnonzero((g == k).any(axis=1))
        assert len(rows) <= 3 and np.all(np.diff(rows) == 1)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), r_h=st.integers(0, 4), r_w=st.integers(0, 4), loc=st.integers(0, 2))
def test_cubist_groups_are_local_blobs_in_row_and_column_order(seed, r_h, r_w, loc):
    model = cubistmerge.patch(small_vit(), "cubist", r=(r_h, r_w), loc=loc, trace_source=True)
    try:
        groups, grid = merge_groups_of(model, noise_image(seed))
    finally:
        cubistmerge.unpatch(model)  # the cached model is shared with other tests
    check_single_pass_layout(groups, grid, r_h, r_w)
    assert merged_grid_of(groups, grid) == (8 - r_h, 8 - r_w)


def test_cubist_layout_on_a_real_picture():
    tensor = torch.from_numpy(smooth_picture(128)).permute(2, 0, 1).float() / 127.5 - 1
    groups, grid = merge_groups_of(patched("cubist", r=(3, 3), loc=1), tensor)
    check_single_pass_layout(groups, grid, 3, 3)


def test_cubist_multi_pass_keeps_a_grid_of_local_groups():
    stages = [(0, 1, 2), (1, 2, 1)]
    groups, grid = merge_groups_of(patched("cubist", stages=stages), noise_image(3))
    assert merged_grid_of(groups, grid) == (8 - 3, 8 - 3)
    stats = group_stats(groups, grid)
    assert stats.num_groups == 25
    # Two passes merge at most 3 neighbours per axis each: no group reaches across the image.
    assert stats.widest <= 5


def test_merged_grid_of_recognises_grids_only():
    identity = torch.arange(12)
    assert merged_grid_of(identity, (3, 4)) == (3, 4)
    # Columns 0-1 and 2-3 merged in every row: a 3x2 grid.
    halves = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    assert merged_grid_of(halves, (3, 4)) == (3, 2)
    # The same ids with the two far corners swapped: no row/column layout explains them.
    scattered = torch.tensor([5, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 0])
    assert merged_grid_of(scattered, (3, 4)) is None
    assert merged_grid_of(torch.tensor([0, 2, 2, 3]), (2, 2)) is None  # id 1 missing


def test_merge_groups_of_needs_a_traced_patched_model():
    image = noise_image(0)
    with pytest.raises(ValueError, match="not patched"):
        merge_groups_of(copy.deepcopy(small_vit()), image)
    untraced = cubistmerge.patch(copy.deepcopy(small_vit()), "cubist", r=1)
    with pytest.raises(ValueError, match="trace_source=True"):
        merge_groups_of(untraced, image)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        merge_groups_of(patched("cubist", r=1), image[:2])


def test_merge_groups_of_restores_training_mode_and_unwraps_backbone():
    class Wrapper(nn.Module):  # like a real-weight model: a ViT backbone plus a head of its own
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(4, 1)

    wrapper = Wrapper(patched("cubist", r=2)).train()
    groups, grid = merge_groups_of(wrapper, noise_image(4))
    assert len(groups.unique()) == 36 and grid == (8, 8)
    assert all(module.training for module in wrapper.modules())


# --------------------------------------------------------------------------- drawing


def test_group_colour_image_shapes_modes_and_boundaries():
    grid = (4, 4)
    # Left half one group, right half four row groups: borders at x = 8 and between the right rows.
    source = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3], [0, 0, 4, 4]]).reshape(-1)
    picture = smooth_picture(16)
    before = picture.copy()
    for colour in ("random", "mean"):
        drawn = group_colour_image(source, grid, picture, colour=colour, boundary_colour=(0, 255, 0))
        assert drawn.shape == picture.shape and drawn.dtype == np.uint8
        assert np.array_equal(drawn[:, 7], np.tile([0, 255, 0], (16, 1)))  # the border left of x = 8
        assert np.array_equal(drawn[3, 8:], np.tile([0, 255, 0], (8, 1)))  # between rows 0 and 1 on the right
        assert not np.all(drawn[0, :7] == [0, 255, 0])
    np.testing.assert_array_equal(picture, before)  # input not modified

    mean = group_colour_image(source, grid, picture, colour="mean", boundary_colour=None)
    expected = picture[:, :8].reshape(-1, 3).mean(axis=0).round()
    assert np.all(mean[:, :8] == expected)
    # Random colours differ between groups and are the same within one.
    plain = group_colour_image(source, grid, np.zeros_like(picture), alpha=1.0, boundary_colour=None)
    assert len({tuple(plain[y, x]) for y in range(16) for x in range(8)}) == 1
    assert len({tuple(plain[4 * g + 1, 12]) for g in range(4)} | {tuple(plain[0, 0])}) == 5


def test_grid_colours_follow_merged_rows_and_columns():
    source = torch.arange(16)
    drawn = group_colour_image(
        source,
        (4, 4),
        np.zeros((8, 8, 3), np.uint8),
        colour="grid",
        merged_grid=(4, 4),
        alpha=1.0,
        boundary_colour=None,
    )
    corners = drawn[::2, ::2]  # one pixel per token
    assert np.array_equal(corners[0, 0], corners[2, 2]) and np.array_equal(corners[1, 1], corners[3, 3])
    assert not np.array_equal(corners[0, 0], corners[0, 1])  # column neighbours differ
    assert not np.array_equal(corners[0, 0], corners[1, 0])  # row neighbours differ
    with pytest.raises(ValueError, match="merged_grid"):
        group_colour_image(source, (4, 4), np.zeros((8, 8, 3), np.uint8), colour="grid")


def test_links_and_tokens_draw_on_a_larger_image():
    # Group 0 in two pieces, two corners apart: a white link crosses the middle.
    source = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 0])
    image = np.zeros((64, 64, 3), np.uint8)
    linked = group_colour_image(source, (4, 4), image, link_colour=(255, 255, 255), boundary_colour=None)
    assert np.array_equal(linked[32, 32], [255, 255, 255])
    dotted = group_colour_image(torch.arange(16), (4, 4), image, tokens=True, merged_grid=(4, 4))
    assert np.array_equal(dotted[8, 8], [255, 255, 255])  # the centre of token 0
    assert np.array_equal(dotted[8, 16], [255, 255, 255])  # the row line to token 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(colour="pastel"), "colour must be one of"),
        (dict(alpha=1.5), "alpha"),
        (dict(boundary_width=0), "boundary_width"),
        (dict(boundary_colour=(0, 0)), "boundary_colour"),
    ],
)
def test_group_colour_image_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_colour_image(torch.arange(4), (2, 2), np.zeros((8, 8, 3), np.uint8), **kwargs)


def test_group_colour_image_rejects_bad_inputs():
    with pytest.raises(ValueError, match="H\\*W = 4"):
        group_colour_image(torch.arange(5), (2, 2), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        group_colour_image(torch.arange(4), (2, 2), np.zeros((8, 8, 3), np.float32))


# --------------------------------------------------------------------------- the PNG


def test_visualize_methods_writes_one_png(tmp_path):
    image_path = tmp_path / "picture.png"
    Image.fromarray(smooth_picture(96)).save(image_path)
    methods = [
        (None, "cubist", dict(r=1, loc=1)),
        ("ToMe, constant r", "tome", dict(r=2)),
    ]
    path, results = visualize_methods(image_path, TINY_NAME, methods, img_size=64, output=tmp_path / "out" / "v.png")
    assert path == tmp_path / "out" / "v.png"
    with Image.open(path) as written:
        assert written.format == "PNG" and written.width > written.height
    cubist, tome = results
    assert cubist.label == "CubistMerge r=1 @1" and tome.label == "ToMe, constant r"
    assert cubist.grid == tome.grid == (4, 4)
    assert cubist.groups.shape == (16,) and cubist.num_tokens == 9 and cubist.merged_grid == (3, 3)
    # 12 blocks with r=2 would remove 24 of 16 patches: every block takes what is left, down to 1 token.
    assert tome.merged_grid is None and tome.num_tokens < 16


def test_visualize_methods_leaves_a_given_model_alone(tmp_path):
    model = small_vit(img_size=64, depth=2)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    picture = smooth_picture(80)
    path, results = visualize_methods(picture, model, [(None, "cubist", dict(r=(1, 2)))], output=tmp_path / "a.png")
    assert path.is_file() and results[0].merged_grid == (3, 2)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert not hasattr(model, "cubistmerge_source")
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    with pytest.raises(ValueError, match="img_size must be None or"):
        visualize_methods(picture, model, [(None, "cubist", {})], img_size=96, output=tmp_path / "b.png")


def test_visualize_methods_errors(tmp_path):
    picture = smooth_picture(32)
    out = tmp_path / "x.png"
    with pytest.raises(UnsupportedModelError, match="VisionTransformer or Eva"):
        visualize_methods(picture, nn.Sequential(nn.Conv2d(3, 4, 3)), [(None, "cubist", {})], output=out)
    with pytest.raises(FileNotFoundError, match="no_such.jpg"):
        visualize_methods(tmp_path / "no_such.jpg", TINY_NAME, [(None, "cubist", {})], img_size=64, output=out)
    with pytest.raises(ValueError, match=r"method must be one of \('cubist', 'tome'\)"):
        visualize_methods(picture, TINY_NAME, [(None, "pitome", {})], img_size=64, output=out)
    with pytest.raises(ValueError, match="record merge groups"):  # Expedite rebuilds tokens: no groups to draw
        visualize_methods(picture, TINY_NAME, [(None, "expedite", {})], img_size=64, output=out)
    with pytest.raises(ValueError, match="non-empty list"):
        visualize_methods(picture, TINY_NAME, [], img_size=64, output=out)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        visualize_methods(picture[..., 0], TINY_NAME, [(None, "cubist", {})], img_size=64, output=out)
    with pytest.raises(ValueError, match="colour must be"):
        visualize_methods(picture, TINY_NAME, [(None, "cubist", {})], img_size=64, output=out, colour="grid")
    assert not out.exists()


def test_describe_names_method_and_settings():
    assert describe("cubist", dict(r=2, loc=1)) == "CubistMerge r=2 @1"
    assert describe("cubist", dict(r=(4, 4))) == "CubistMerge r=(4,4) @1"
    assert describe("cubist", dict(stages=[(1, 2, 2)], metric="l2")) == "CubistMerge stages=[(1,2,2)] metric=l2"
    assert describe("tome", dict(r=8, trace_source=True)) == "ToMe r=8"


def test_cli_visualize_writes_the_png(tmp_path, capsys):
    from cubistmerge.cli import main

    image_path = tmp_path / "picture.png"
    Image.fromarray(smooth_picture(96)).save(image_path)
    out = tmp_path / "groups.png"
    argv = ["visualize", str(image_path), "--model", TINY_NAME, "--img-size", "64", "--output", str(out),
            "--setting", "cubist r=1 loc=1", "--setting", "tome r=2"]  # fmt: skip
    assert main(argv) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "CubistMerge r=1 @1: 9 tokens" in printed and f"wrote {out}" in printed
    with pytest.raises(SystemExit):
        main(["visualize", str(tmp_path / "missing.png")])
    assert main(["visualize", str(image_path), "--model", TINY_NAME, "--img-size", "64", "--output", str(out),
                 "--setting", "cubist r=9"]) == 2  # fmt: skip
    assert "error" in capsys.readouterr().err


def test_token_layout_image_places_mean_colours():
    from cubistmerge.visualize import token_layout_image

    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[:, 2:] = 200  # right half bright
    groups = np.array([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
    as_grid = token_layout_image(groups, (4, 4), image, merged_grid=(2, 2))
    assert as_grid.shape == (2, 2, 3) and as_grid[0, 0, 0] == 0 and as_grid[0, 1, 0] == 200
    assert as_grid[1, 1, 2] == 200
    sequence = token_layout_image(np.array([0, 1, 2, 0]), (2, 2), image[:2, :2], fill=(9, 9, 9))
    assert sequence.shape == (2, 2, 3) and (sequence[1, 1] == 9).all()  # 3 tokens in a 2x2 block, one cell empty
    with pytest.raises(ValueError, match="holds 9 tokens"):
        token_layout_image(groups, (4, 4), image, merged_grid=(3, 3))
