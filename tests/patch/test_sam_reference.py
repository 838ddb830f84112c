"""CubistMerge on SAM-style encoders equals a hand-built forward (float64, both families).

Families: the official ``segment_anything`` ``ImageEncoderViT`` and timm's
``samvit_base_patch16``, both tiny, with random relative-position tables,
biases, norms, absolute positions and (timm) LayerScale gammas, so that every
part of a block moves the output by far more than the tolerance.

The reference below shares no code with ``cubistmerge``. Blocks before the
first reduction run as they are. At a reduction the grid is reduced by the loop
reference of ``tests/merge/reference.py``: in ``windows="window"`` mode inside
every attention window on its own (the windows tile the grid from the top-left;
an edge window of ``e`` real rows / columns loses ``min(r, e // 2)`` of them;
padding is never merged), in ``"grid"`` mode the whole grid at once. Every block
after it is written out here from the block's own submodules: norm1, a window
partition with zero padding (the reduced window size in window mode, the
block's own in grid mode), attention from ``attn.qkv`` with the scale and
decomposed relative positions whose tables are interpolated to the current
window / grid by the family's own ``get_rel_pos``, softmax, ``attn.proj``, the
padding dropped, the (LayerScale'd) residual, norm2, the MLP, the residual.
Global blocks see the whole reduced grid. Before the neck every original
position takes its merged token through the composed index maps (``ref.compose``
/ ``ref.unmerge``), and the model's neck runs on the full grid.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling import image_encoder as sam_image_encoder
from timm.models import vision_transformer_sam as timm_sam_module
from torch import nn

import cubistmerge

from ..merge import reference as ref

FAMILIES = ("segment_anything", "timm")
TOL = 1e-10
MATTERS = 1e-3  # what a merge (or a wrong detail) must move the output by at least
NECK = 16


# --------------------------------------------------------------------------- models


# Tiny float64 models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_encoder(
    family: str,
    img: int | tuple[int, int] = 160,
    window: int = 4,
    global_attn_indexes: tuple[int, ...] = (2,),
    depth: int = 4,
) -> nn.Module:
    """A tiny float64 encoder with every parameter that is zero / one / identity at init randomised."""
    torch.manual_seed(0)
    if family == "timm":
        model = timm.create_model(
            "samvit_base_patch16", pretrained=False, img_size=img, depth=depth, embed_dim=32, num_heads=2,
            window_size=window, global_attn_indexes=list(global_attn_indexes), neck_chans=NECK, num_classes=0,
            init_values=0.5,
        )
    else:
        assert isinstance(img, int), "segment_anything's encoder takes square images only"
        model = ImageEncoderViT(
            img_size=img, depth=depth, embed_dim=32, num_heads=2, use_rel_pos=True, window_size=window,
            global_attn_indexes=global_attn_indexes, out_chans=NECK,
        )
    model = model.double().eval()
    generator = torch.Generator().manual_seed(1)

    def randn(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                parameter.copy_(0.5 * randn(parameter.shape))
            elif name.endswith(".gamma"):  # LayerScale: far from 1 and from each other
                parameter.copy_(0.2 + 1.5 * torch.rand(parameter.shape, generator=generator, dtype=torch.float64))
            elif name.endswith(".bias"):
                parameter.copy_(0.1 * randn(parameter.shape))
            elif parameter.dim() == 1:  # norm weights
                parameter.copy_(1.0 + 0.2 * randn(parameter.shape))
    if family == "timm":
        assert all(isinstance(blk.ls1, timm.layers.LayerScale) for blk in model.blocks)
    return model


def images_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    if isinstance(model, ImageEncoderViT):
        size = (model.img_size, model.img_size)
    else:
        size = tuple(model.patch_embed.img_size)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_features(images) if hasattr(model, "forward_features") else model(images)


def patched(model: nn.Module, **options) -> nn.Module:
    return cubistmerge.patch(copy.deepcopy(model), "cubist", **options)


# --------------------------------------------------------------------------- hand-built blocks


def family_of(model_or_block: nn.Module) -> str:
    return "timm" if type(model_or_block).__module__.startswith("timm") else "segment_anything"


def rel_table(family: str, rel_pos: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """(size, size, d): the embedding of every (query, key) offset along one axis."""
    if how == "interpolate":  # what SAM does: the table linearly resized to 2 * size - 1 entries
        get_rel_pos = sam_image_encoder.get_rel_pos if family == "segment_anything" else timm_sam_module.get_rel_pos
        return get_rel_pos(size, size, rel_pos)
    assert how == "crop"  # a wrong variant: the central 2 * size - 1 entries, not interpolated
    start = (rel_pos.shape[0] - (2 * size - 1)) // 2
    table = rel_pos[start : start + 2 * size - 1]
    offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
    return table[offsets]


def hand_attention(attn: nn.Module, x: torch.Tensor, family: str, rel_pos: str) -> torch.Tensor:
    """Global multi-head attention with decomposed relative positions on a (B, H, W, C) grid."""
    B, H, W, C = x.shape
    N = H * W
    heads = attn.num_heads
    qkv = attn.qkv(x.reshape(B, N, C)).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d)
    if family == "timm":
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    table_h = rel_table(family, attn.rel_pos_h, H, rel_pos)  # (H, H, d)
    table_w = rel_table(family, attn.rel_pos_w, W, rel_pos)  # (W, W, d)
    grid_q = q.reshape(B, heads, H, W, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)  # query row h, key row k
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)  # query column w, key column k
    logits = logits.reshape(B, heads, H, W, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
    weights = logits.reshape(B, heads, N, N).softmax(dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(B, H, W, -1)
    return attn.proj(out)


def hand_block(block: nn.Module, x: torch.Tensor, window: int, rel_pos: str = "interpolate") -> torch.Tensor:
    """One block on a (B, H, W, C) grid with ``window`` (0: global attention)."""
    family = family_of(block)
    B, H, W, C = x.shape
    normed = block.norm1(x)
    if window == 0:
        attended = hand_attention(block.attn, normed, family, rel_pos)
    else:
        attended = torch.zeros_like(normed)
        for h0 in range(0, H, window):
            for w0 in range(0, W, window):
                h1, w1 = min(h0 + window, H), min(w0 + window, W)
                tile = normed.new_zeros(B, window, window, C)  # zero padding after norm1, as SAM pads
                tile[:, : h1 - h0, : w1 - w0] = normed[:, h0:h1, w0:w1]
                out = hand_attention(block.attn, tile, family, rel_pos)
                attended[:, h0:h1, w0:w1] = out[:, : h1 - h0, : w1 - w0]  # the padding is dropped
    if family == "timm":
        attended = attended * block.ls1.gamma  # drop_path1 is the identity in eval
    x = x + attended
    mlp = block.mlp(block.norm2(x))
    if family == "timm":
        mlp = mlp * block.ls2.gamma
    return x + mlp


# --------------------------------------------------------------------------- loop reductions


def _tiles(length: int, window: int) -> list[tuple[int, int]]:
    """(start, real extent) of the windows along one axis, from the top-left as SAM's window_partition."""
    return [(start, min(window, length - start)) for start in range(0, length, window)]


def _offsets(extents: list[int]) -> list[int]:
    out = [0]
    for e in extents:
        out.append(out[-1] + e)
    return out


def reduce_in_windows(x: torch.Tensor, window: int, r: int, representation: str, metric: str):
    """CubistMerge inside every window; returns the reduced grid and every image's flat index map."""
    B, H, W, C = x.shape
    rows, cols = _tiles(H, window), _tiles(W, window)
    lost_h = [min(r, e // 2) for _, e in rows]  # an edge window cannot lose more than half its real rows
    lost_w = [min(r, e // 2) for _, e in cols]
    kept_h = [e - lost for (_, e), lost in zip(rows, lost_h, strict=True)]
    kept_w = [e - lost for (_, e), lost in zip(cols, lost_w, strict=True)]
    top, left = _offsets(kept_h), _offsets(kept_w)
    Hm, Wm = top[-1], left[-1]
    merged_images, indices = [], []
    for b in range(B):
        merged = [[None] * Wm for _ in range(Hm)]
        index = [-1] * (H * W)
        for i, (h0, eh) in enumerate(rows):
            for j, (w0, ew) in enumerate(cols):
                tile = x[b, h0 : h0 + eh, w0 : w0 + ew].tolist()  # real tokens only, never padding
                values, tile_index = ref.cubist_merge_image(tile, lost_h[i], lost_w[j], representation, metric)
                for a in range(kept_h[i]):
                    for c in range(kept_w[j]):
                        merged[top[i] + a][left[j] + c] = values[a][c]
                for t, slot in enumerate(tile_index):
                    th, tw = divmod(t, ew)
                    sh, sw = divmod(slot, kept_w[j])
                    index[(h0 + th) * W + w0 + tw] = (top[i] + sh) * Wm + left[j] + sw
        assert -1 not in index
        merged_images.append(merged)
        indices.append(index)
    return torch.tensor(merged_images, dtype=x.dtype), indices


def reduce_grid(x: torch.Tensor, r_h: int, r_w: int, representation: str, metric: str):
    results = [ref.cubist_merge_image(x[b].tolist(), r_h, r_w, representation, metric) for b in range(len(x))]
    return torch.tensor([merged for merged, _ in results], dtype=x.dtype), [index for _, index in results]


def recover(x: torch.Tensor, indices: list[list[int]] | None, grid: tuple[int, int]) -> torch.Tensor:
    """Every original position takes its merged token (the loop reference's unmerge)."""
    if indices is None:
        return x
    B, Hm, Wm, C = x.shape
    full = [ref.unmerge(x[b].reshape(Hm * Wm, C).tolist(), indices[b]) for b in range(B)]
    return torch.tensor(full, dtype=x.dtype).reshape(B, *grid, C)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(images)  # (B, H, W, C) in both families
    x = x + model.pos_embed
    if family_of(model) == "timm":
        x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    return x


def reference_forward(
    model: nn.Module,
    images: torch.Tensor,
    stages: dict[int, tuple[int, int]],
    windows: str,
    *,
    representation: str = "maxmag",
    metric: str = "cosine",
    rel_pos: str = "interpolate",
    take: tuple[int, ...] = (),
):
    """Neck output and the recovered (B, H, W, C) outputs of the blocks in ``take``."""
    x = embed(model, images)
    grid = tuple(x.shape[1:3])
    window = max(blk.window_size for blk in model.blocks)  # all windowed blocks share one size
    indices = None
    intermediates = {}
    for i, block in enumerate(model.blocks):
        if i in stages:
            r_h, r_w = stages[i]
            if windows == "window" and window:
                assert r_h == r_w
                x, index = reduce_in_windows(x, window, r_h, representation, metric)
                window -= r_h  # the same windows, each smaller
            else:
                x, index = reduce_grid(x, r_h, r_w, representation, metric)  # windows are formed anew
            indices = index if indices is None else [ref.compose(a, b) for a, b in zip(indices, index, strict=True)]
        if indices is None:
            x = block(x)  # before any reduction: the block as it is
        else:
            x = hand_block(block, x, window if block.window_size else 0, rel_pos)
        if i in take:
            intermediates[i] = recover(x, indices, grid)
    full = recover(x, indices, grid)
    return model.neck(full.permute(0, 3, 1, 2)), intermediates


def check_equal(model, images, options, stages, windows, **reference_options):
    with torch.no_grad():
        unmerged = encode(model, images)
        expected, _ = reference_forward(model, images, stages, windows, **reference_options)
        out = encode(patched(model, windows=windows, **options), images)
    assert out.shape == expected.shape == unmerged.shape
    assert (expected - unmerged).abs().max() > MATTERS, "the reduction must matter"
    assert (out - expected).abs().max() <= TOL
    return out, expected


# --------------------------------------------------------------------------- tests: window mode

# (encoder settings, patch options, reference stages). Grid sizes: 160 px -> 10x10, 192 px -> 12x12.
WINDOW_CASES = {
    # windows 4, 4, 2: the 4s become 3, the 2-token edge windows lose 1 -> a 7x7 grid in windows of 3
    "10grid_w4_r1": (dict(), dict(r=1, loc=1), {1: (1, 1)}),
    # the 4s become 2, the edge windows lose min(2, 2 // 2) = 1 -> 5x5 in windows of 2; from block 0
    "10grid_w4_r2_loc0": (dict(), dict(r=2, loc=0), {0: (2, 2)}),
    # the reduction at a global block's input, and a windowed block after it
    "10grid_w4_r1_at_global": (dict(depth=4, global_attn_indexes=(2,)), dict(r=1, loc=2), {2: (1, 1)}),
    # windows 5, 5, 2 -> 3, 3, 1: a 7x7 grid in windows of 3, two global blocks
    "12grid_w5_r2": (dict(img=192, window=5, global_attn_indexes=(1, 3)), dict(r=2, loc=1), {1: (2, 2)}),
    # a fraction counts per window side: 0.25 of 4 -> 1 (of the 10x10 grid it would be 3)
    "fraction": (dict(), dict(r=0.25, loc=1), {1: (1, 1)}),
    # no windowed block at all: the whole grid is reduced
    "no_windows": (dict(window=0, global_attn_indexes=()), dict(r=2, loc=1), {1: (2, 2)}),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_window_mode_equals_reduction_inside_every_window(family, case):
    settings, options, stages = WINDOW_CASES[case]
    model = make_encoder(family, **settings)
    check_equal(model, images_for(model), options, stages, "window")


@pytest.mark.parametrize("family", FAMILIES)
def test_window_mode_several_stages(family):
    """4 -> 3 -> 2 windows; the edge windows 2 -> 1 -> 1 (a one-token edge cannot lose any): 10 -> 7 -> 5."""
    model = make_encoder(family, depth=5, global_attn_indexes=(2,))
    images = images_for(model)
    out, _ = check_equal(model, images, dict(stages=[(1, 1, 1), (3, 1, 1)]), {1: (1, 1), 3: (1, 1)}, "window")
    with torch.no_grad():
        one_stage = encode(patched(model, windows="window", r=1, loc=1), images)
    assert (out - one_stage).abs().max() > MATTERS  # the second stage matters


@pytest.mark.parametrize(("representation", "metric"), [("mean", "l2"), ("maxmag_vector", "cosine")])
@pytest.mark.parametrize("family", FAMILIES)
def test_window_mode_representation_and_metric(family, representation, metric):
    model = make_encoder(family)
    options = dict(r=1, loc=1, representation=representation, metric=metric)
    check_equal(model, images_for(model), options, {1: (1, 1)}, "window", representation=representation, metric=metric)


def test_timm_window_mode_on_a_rectangular_grid():
    """10x12 tokens in windows of 4: rows 4, 4, 2 and columns 4, 4, 4 -> a 7x9 grid in windows of 3."""
    model = make_encoder("timm", img=(160, 192), depth=4, global_attn_indexes=(2,))
    check_equal(model, images_for(model), dict(r=1, loc=1), {1: (1, 1)}, "window")


@pytest.mark.parametrize("family", FAMILIES)
def test_window_mode_keeps_windows_square(family):
    model = make_encoder(family)
    with pytest.raises(ValueError, match="square"), torch.no_grad():
        encode(patched(model, windows="window", r=(1, 2), loc=1), images_for(model))
    with pytest.raises(ValueError, match="at most 2"):  # windows of 4 lose at most 2 per side
        patched(model, windows="window", r=3, loc=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_interpolated_relative_positions_matter(family):
    """The reference's tables interpolated to the reduced windows; merely cropping them is far off."""
    model = make_encoder(family)
    images = images_for(model)
    out, _ = check_equal(model, images, dict(r=1, loc=1), {1: (1, 1)}, "window")
    with torch.no_grad():
        cropped, _ = reference_forward(model, images, {1: (1, 1)}, "window", rel_pos="crop")
    assert (out - cropped).abs().max() > MATTERS


# --------------------------------------------------------------------------- tests: grid mode

GRID_CASES = {
    # 10 -> 9: windows of 4 re-formed on 9x9, the last one 1 real token wide (3 of padding)
    "10grid_r1": (dict(), dict(r=1, loc=1), {1: (1, 1)}),
    # 10 -> 8: exactly 2x2 windows of 4
    "10grid_r2": (dict(), dict(r=2, loc=1), {1: (2, 2)}),
    # 10 -> 7 from block 0; a fraction counts of the grid side here: 0.25 of 10 -> 3
    "10grid_fraction_loc0": (dict(), dict(r=0.25, loc=0), {0: (3, 3)}),
    # r_h != r_w is allowed on the whole grid: 10x10 -> 9x8 (windows of 4 on a non-square grid)
    "10grid_r1x2": (dict(), dict(r=(1, 2), loc=1), {1: (1, 2)}),
    # 12 -> 10 in windows of 5, two global blocks
    "12grid_w5_r2": (dict(img=192, window=5, global_attn_indexes=(1, 3)), dict(r=2, loc=1), {1: (2, 2)}),
    "two_stages": (dict(depth=5), dict(stages=[(1, 2, 1), (3, 1, 2)]), {1: (2, 1), 3: (1, 2)}),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_grid_mode_equals_reduction_of_the_whole_grid(family, case):
    settings, options, stages = GRID_CASES[case]
    model = make_encoder(family, **settings)
    check_equal(model, images_for(model), options, stages, "grid")


def test_timm_grid_mode_on_a_rectangular_grid():
    model = make_encoder("timm", img=(160, 192), depth=4, global_attn_indexes=(2,))
    check_equal(model, images_for(model), dict(r=(2, 3), loc=1), {1: (2, 3)}, "grid")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_two_modes_differ(family):
    """Same r on the same model: inside windows (10 -> 7) is not the whole grid (10 -> 9)."""
    model = make_encoder(family)
    images = images_for(model)
    window, _ = check_equal(model, images, dict(r=1, loc=1), {1: (1, 1)}, "window")
    grid, _ = check_equal(model, images, dict(r=1, loc=1), {1: (1, 1)}, "grid")
    assert (window - grid).abs().max() > MATTERS


# --------------------------------------------------------------------------- random layouts


@settings(max_examples=16, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    side=st.integers(5, 11),
    window=st.integers(2, 6),
    global_attn_indexes=st.sampled_from([(), (1,), (2,)]),
    loc=st.integers(0, 2),
    windows=st.sampled_from(["window", "grid"]),
    data=st.data(),
)
def test_random_layouts(family, side, window, global_attn_indexes, loc, windows, data):
    """Any grid side, window size (edge windows of 1 to window - 1 real tokens, or none), place and amount."""
    if windows == "window":
        r_h = r_w = data.draw(st.integers(1, window // 2), label="r")
    else:
        r_h = data.draw(st.integers(0, side // 2), label="r_h")
        r_w = data.draw(st.integers(1, side // 2), label="r_w")
    model = make_encoder(family, img=16 * side, window=window, global_attn_indexes=global_attn_indexes, depth=3)
    images = images_for(model, batch=1)
    with torch.no_grad():
        expected, _ = reference_forward(model, images, {loc: (r_h, r_w)}, windows)
        out = encode(patched(model, windows=windows, r=(r_h, r_w), loc=loc), images)
    assert out.shape == expected.shape == (1, NECK, side, side)
    assert (out - expected).abs().max() <= TOL


# --------------------------------------------------------------------------- intermediates and a whole Sam


@pytest.mark.parametrize("windows", ["window", "grid"])
def test_timm_intermediates_equal_recovered_reference_blocks(windows):
    model = make_encoder("timm", depth=5, global_attn_indexes=(2,))
    images = images_for(model)
    stages = {1: (1, 1), 3: (1, 1)}
    take = (0, 1, 2, 3, 4)
    with torch.no_grad():
        expected, blocks = reference_forward(model, images, stages, windows, take=take)
        merging = patched(model, windows=windows, stages=[(1, 1, 1), (3, 1, 1)])
        final, intermediates = merging.forward_intermediates(images, indices=list(take))
        normed = merging.forward_intermediates(images, indices=[2], norm=True, intermediates_only=True)
        early = merging.forward_intermediates(images, indices=[3], stop_early=True, intermediates_only=True)
        plain = model.forward_intermediates(images, indices=[0, 2], intermediates_only=True)
    assert (final - expected).abs().max() <= TOL
    assert len(intermediates) == len(take)
    for i, got in zip(take, intermediates, strict=True):
        want = blocks[i].permute(0, 3, 1, 2)
        assert got.shape == want.shape == (2, 32, 10, 10)
        assert (got - want).abs().max() <= TOL, f"block {i}"
    assert (intermediates[0] - plain[0]).abs().max() <= TOL  # before the reduction: unchanged
    assert (intermediates[2] - plain[1]).abs().max() > MATTERS  # after it: merged, recovered
    assert (normed[0] - model.neck(blocks[2].permute(0, 3, 1, 2))).abs().max() <= TOL
    assert (early[0] - blocks[3].permute(0, 3, 1, 2)).abs().max() <= TOL


def _tiny_sam() -> Sam:
    encoder = make_encoder("segment_anything")
    torch.manual_seed(3)
    prompt_encoder = PromptEncoder(
        embed_dim=NECK, image_embedding_size=(10, 10), input_image_size=(160, 160), mask_in_chans=4
    )
    decoder = MaskDecoder(
        transformer_dim=NECK,
        transformer=TwoWayTransformer(depth=1, embedding_dim=NECK, mlp_dim=32, num_heads=2),
        iou_head_hidden_dim=16,
    )
    sam = Sam(encoder, prompt_encoder, decoder).double().eval()
    prompt_encoder.pe_layer.float()  # it casts coordinates to float32 itself
    return sam


@pytest.mark.parametrize("windows", ["window", "grid"])
def test_patched_sam_gives_the_patched_encoders_embeddings(windows):
    sam = _tiny_sam()
    encoder_alone = patched(sam.image_encoder, windows=windows, r=1, loc=1)
    assert cubistmerge.patch(sam, "cubist", windows=windows, r=1, loc=1) is sam
    assert type(sam) is Sam
    seen = []
    hook = sam.image_encoder.register_forward_hook(lambda _module, _args, output: seen.append(output))
    generator = torch.Generator().manual_seed(4)
    image = 255 * torch.rand(3, 150, 160, generator=generator, dtype=torch.float64)
    box = torch.tensor([[20.0, 30.0, 120.0, 140.0]], dtype=torch.float64)
    with torch.no_grad():
        outputs = sam([{"image": image, "original_size": (150, 160), "boxes": box}], multimask_output=False)
        hook.remove()
        preprocessed = sam.preprocess(image[None])
        alone = encoder_alone(preprocessed)
        expected, _ = reference_forward(sam.image_encoder, preprocessed, {1: (1, 1)}, windows)
        unmerged = cubistmerge.unpatch(copy.deepcopy(sam.image_encoder))(preprocessed)
    assert outputs[0]["masks"].shape == (1, 1, 150, 160)
    (embeddings,) = seen
    assert embeddings.shape == (1, NECK, 10, 10)
    assert torch.equal(embeddings, alone)
    assert (embeddings - expected).abs().max() <= TOL
    assert (embeddings - unmerged).abs().max() > MATTERS
