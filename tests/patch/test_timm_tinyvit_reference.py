"""CubistMerge on timm TinyViT (MobileSAM's encoder) equals a hand-built forward of its design (float64).

The design (``cubistmerge/patch/timm_tinyvit.py``): ``loc`` counts attention blocks over all
stages; the reduction runs on the input of block ``loc``.

* ``windows="window"``: every attention window of the (B, H, W, C) grid (tiled from the top left,
  edge windows holding the rest) is reduced on its own with CubistMerge, an edge window with ``e``
  real rows losing ``min(r, e // 2)`` of them; the reduced grid is then tiled with the reduced
  window ``w - r`` (zero padding at the bottom/right, as timm pads) and the blocks' per-offset bias
  tables are *stretched*: reduced positions i, j of a window stand ``|i - j| * (w - 1) / (w' - 1)``
  original positions apart, and the (|dy|, |dx|) offset table is sampled there bilinearly. A
  later stage starts again with its own window size (and bias) on the reduced grid; a second
  reduction in the same stage reduces the reduced windows again.
* ``windows="grid"``: the whole grid is reduced, and the blocks keep their own window and bias on it.
* The reduced grid flows on through later blocks and stride-1 stages; it is recovered (every
  original position gets its group's token) before a downsampling PatchMerging and at the end,
  so SAM's neck sees the full grid.

The reference forward below shares no code with ``cubistmerge``: stages before the reduction run
as they are, the reduction is the loop reference ``tests/merge/reference.py`` (per window or on
the whole grid, with its own index maps), the blocks after it are written out from the model's own
submodules (norm, qkv split as timm's TinyViT attention, scale, bias, softmax, proj, own window
partition with padding, residual, the local depthwise conv, the MLP), the grid is recovered with
the loop index maps and the neck is applied.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.tiny_vit import Attention, PatchMerging, TinyVitBlock, TinyVitStage

import cubistmerge
from cubistmerge.models import MiniSamImageEncoder
from cubistmerge.patch.timm_tinyvit import stretched_window_bias

from ..merge import reference as ref

# Small MiniSam encoders. Grids are chosen so that the windows never divide them: every reduction
# meets edge windows with fewer real tokens (and padding in the attention).
CONFIGS = {
    # input 184: conv stage 46x46; attention stages on 23x23 (window 7), 12x12 (window 8), 12x12 (window 5, stride 1)
    "small": dict(
        img_size=184,
        embed_dims=(16, 24, 32, 40),
        depths=(1, 3, 2, 2),
        num_heads=(1, 2, 2, 2),
        window_sizes=(7, 7, 8, 5),
        out_chans=24,
    ),
    # MobileSAM's windows: 31x31 (window 7), 16x16 (window 14), 16x16 (window 7, stride 1)
    "mobile": dict(
        img_size=248,
        embed_dims=(16, 24, 32, 40),
        depths=(1, 2, 2, 2),
        num_heads=(1, 2, 2, 2),
        window_sizes=(7, 7, 14, 7),
        out_chans=24,
    ),
}

# (config, windows, stages): stages as for cubistmerge.patch, (loc, r_h, r_w).
# small: blocks 0-2 stage 1 (23x23, window 7), 3-4 stage 2 (12x12, window 8), 5-6 stage 3 (12x12, window 5)
# mobile: blocks 0-1 stage 1 (31x31, window 7), 2-3 stage 2 (16x16, window 14), 4-5 stage 3 (16x16, window 7)
CASES = {
    # 7 -> 5 inside windows (edge band 2 -> 1): 23 -> 16; recovered before stage 2's downsampling
    "window-stage1": ("small", "window", [(0, 2, 2)]),
    # two reductions in one stage: 7 -> 6 (23 -> 19), then the 6-windows -> 5 (19 -> 16)
    "window-twice-in-stage1": ("small", "window", [(1, 1, 1), (2, 1, 1)]),
    # 8 -> 5 (12 = 8 + 4 -> 5 + 2); stage 3 (stride 1) continues on the 7x7 grid with its own 5-windows
    "window-stage2-into-stage3": ("small", "window", [(3, 3, 3)]),
    # and a second reduction inside stage 3's 5-windows of the reduced grid (8 = 5 + 3 -> 4 + 2)
    "window-stage2-and-stage3": ("small", "window", [(3, 2, 2), (6, 1, 1)]),
    # MobileSAM: 14 -> 12 (16 = 14 + 2 -> 12 + 1), then stage 3's 7-windows -> 4 (13 = 7 + 6 -> 4 + 3)
    "window-mobile": ("mobile", "window", [(2, 2, 2), (5, 3, 3)]),
    # fractions resolve against the window in force: 0.17 * 14 -> 2 (of the 16x16 grid: 3); 0.3 * 7 -> 2
    "window-mobile-fractions": ("mobile", "window", [(3, 0.17, 0.17), (4, 0.3, 0.3)]),
    # 7 -> 4 inside windows (31 = 4 * 7 + 3 -> 4 * 4 + 2)
    "window-mobile-stage1": ("mobile", "window", [(0, 3, 3)]),
    # the whole 23x23 grid -> 20x20, windows re-formed with the blocks' own 7 and bias
    "grid-stage1": ("small", "grid", [(1, 3, 3)]),
    # 12x12 -> 10x9 (r_h != r_w), on into stage 3, then 10x9 -> 9x8 there
    "grid-stage2-and-stage3": ("small", "grid", [(3, 2, 3), (6, 1, 1)]),
    # a fraction of the grid side: 0.25 * 16 -> 4
    "grid-mobile": ("mobile", "grid", [(2, 0.25, 0.25)]),
}


# Tiny float64 models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_encoder(config: str) -> MiniSamImageEncoder:
    torch.manual_seed(0)
    encoder = MiniSamImageEncoder(**CONFIGS[config]).double().eval()
    generator = torch.Generator().manual_seed(1)

    def noise(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("attention_biases"):  # zeros at init: a wrong bias would not show
                parameter.copy_(1.5 * noise(parameter.shape))
            elif name.endswith(".bias"):  # conv (folded BN), Linear and LayerNorm biases
                parameter.copy_(0.1 * noise(parameter.shape))
            elif parameter.dim() == 1:  # LayerNorm / LayerNorm2d weights
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator, dtype=torch.float64))
        # TinyViT has no residual around its depthwise convs (the local conv between attention and MLP, the
        # downsampling one): at init they shrink the signal block after block, so that a change in an early
        # stage hardly reaches the neck. Near-identity kernels with noise keep every stage visible.
        for module in encoder.modules():
            if isinstance(module, TinyVitBlock | PatchMerging):
                conv = module.local_conv.conv if isinstance(module, TinyVitBlock) else module.conv2.conv
                conv.weight.copy_(0.25 * noise(conv.weight.shape))
                conv.weight[:, :, 1, 1] += 1
    encoder.clear_attention_bias_cache()
    return encoder


def images_for(config: str, batch: int = 2) -> torch.Tensor:
    size = CONFIGS[config]["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


# --------------------------------------------------------------------------- the stretched bias, by loops


def loop_stretched_bias(attn: Attention, window: int) -> torch.Tensor:
    """(heads, window**2, window**2): the per-offset table of a w x w attention sampled for a reduced window.

    Reduced position i sits at original coordinate i * (w - 1) / (window - 1) (the reduced window
    covers the same area), so reduced positions i, j stand |i - j| * (w - 1) / (window - 1) apart;
    the (|dy|, |dx|) table is interpolated bilinearly between the neighbouring whole offsets.
    """
    w = attn.resolution[0]
    heads = attn.num_heads
    biases = attn.attention_biases.detach().tolist()
    idxs = attn.attention_bias_idxs.tolist()
    column = {}  # (|dy|, |dx|) -> column of attention_biases, read off timm's pairs of the original window
    for p in range(w * w):
        for q in range(w * w):
            offset = (abs(p // w - q // w), abs(p % w - q % w))
            assert column.setdefault(offset, idxs[p][q]) == idxs[p][q]
    span = max(window - 1, 1)

    def sample(steps: int) -> tuple[int, int, float]:
        distance = steps * (w - 1) / span
        lower = min(math.floor(distance), w - 1)
        return lower, min(lower + 1, w - 1), distance - lower

    n = window * window
    out = []
    for h in range(heads):
        rows = []
        for query in range(n):
            yi, xi = divmod(query, window)
            row = []
            for key in range(n):
                yj, xj = divmod(key, window)
                y_lo, y_hi, fy = sample(abs(yi - yj))
                x_lo, x_hi, fx = sample(abs(xi - xj))

                def table(dy: int, dx: int, h: int = h) -> float:
                    return biases[h][column[(dy, dx)]]

                row.append(
                    table(y_lo, x_lo) * (1 - fy) * (1 - fx)
                    + table(y_hi, x_lo) * fy * (1 - fx)
                    + table(y_lo, x_hi) * (1 - fy) * fx
                    + table(y_hi, x_hi) * fy * fx
                )
            rows.append(row)
        out.append(rows)
    return torch.tensor(out, dtype=attn.attention_biases.dtype)


def random_attention(w: int, heads: int = 2, seed: int = 0) -> Attention:
    attn = Attention(8 * heads, 8, heads, attn_ratio=1, resolution=(w, w)).double()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        attn.attention_biases.copy_(torch.randn(attn.attention_biases.shape, generator=generator, dtype=torch.float64))
    return attn


@pytest.mark.parametrize(
    ("w", "window"), [(7, 5), (7, 4), (7, 6), (14, 12), (14, 7), (8, 5), (5, 3), (7, 7), (14, 14), (3, 2), (2, 1)]
)
def test_stretched_bias_equals_the_loop_reference(w, window):
    attn = random_attention(w)
    expected = loop_stretched_bias(attn, window)
    with torch.no_grad():
        got = stretched_window_bias(attn, window)
    assert got.shape == expected.shape == (attn.num_heads, window**2, window**2)
    assert (got - expected).abs().max() <= 1e-12
    if window == w:  # the window's own size is its own table, exactly
        assert torch.equal(got, attn.attention_biases[:, attn.attention_bias_idxs])
    elif window > 1 and (w - 1) % (window - 1):
        # some offsets fall between whole ones: the interpolation really is exercised
        whole = attn.attention_biases[:, attn.attention_bias_idxs[0].view(w, w)[:window, :window].reshape(-1)]
        assert (expected[:, 0] - whole).abs().max() > 1e-3


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=2, max_value=10), st.data())
def test_stretched_bias_equals_the_loop_reference_for_any_sizes(w, data):
    window = data.draw(st.integers(min_value=w - w // 2, max_value=w), label="window")
    attn = random_attention(w, heads=data.draw(st.integers(1, 3), label="heads"), seed=w)
    with torch.no_grad():
        got = stretched_window_bias(attn, window)
    assert (got - loop_stretched_bias(attn, window)).abs().max() <= 1e-12


# --------------------------------------------------------------------------- reductions and recovery, by loops


def resolve(amount: int | float, side: int) -> int:
    """An int is tokens; a float a fraction of the side in force, rounded half up."""
    return amount if isinstance(amount, int) else int(math.floor(amount * side + 0.5))


def window_merge_loop(x: torch.Tensor, window: int, r_h: int, r_w: int):
    """CubistMerge inside every window of (B, H, W, C); returns (merged grid, per-image index maps, new window).

    Windows tile the grid from the top left; an edge window of e real rows (columns) loses
    min(r, e // 2) of them. Reduced window (a, b) sits at (a * (window - r_h), b * (window - r_w)).
    """
    B, H, W, C = x.shape
    row_starts, col_starts = list(range(0, H, window)), list(range(0, W, window))

    def reduced(extent: int, r: int) -> int:
        return extent - min(r, extent // 2)

    Hm = sum(reduced(min(window, H - s), r_h) for s in row_starts)
    Wm = sum(reduced(min(window, W - s), r_w) for s in col_starts)
    merged = x.new_zeros(B, Hm, Wm, C)
    maps = []
    for b in range(B):
        flat = [-1] * (H * W)
        for a, h0 in enumerate(row_starts):
            for c, w0 in enumerate(col_starts):
                eh, ew = min(window, H - h0), min(window, W - w0)
                tile = x[b, h0 : h0 + eh, w0 : w0 + ew].tolist()
                values, index = ref.cubist_merge_image(tile, min(r_h, eh // 2), min(r_w, ew // 2))
                m0, c0 = a * (window - r_h), c * (window - r_w)
                mh, mw = len(values), len(values[0])
                merged[b, m0 : m0 + mh, c0 : c0 + mw] = torch.tensor(values, dtype=x.dtype)
                for t, slot in enumerate(index):
                    sh, sw = divmod(slot, mw)
                    flat[(h0 + t // ew) * W + w0 + t % ew] = (m0 + sh) * Wm + c0 + sw
        assert min(flat) >= 0
        maps.append(flat)
    return merged, maps, window - r_h


def grid_merge_loop(x: torch.Tensor, r_h: int, r_w: int):
    images = [ref.cubist_merge_image(x[b].tolist(), r_h, r_w) for b in range(x.shape[0])]
    merged = torch.tensor([values for values, _ in images], dtype=x.dtype)
    return merged, [index for _, index in images]


def recover_loop(x: torch.Tensor, maps: list[list[int]], grid: tuple[int, int]) -> torch.Tensor:
    """(B, H', W', C) -> (B, H, W, C): every original position gets the token of its slot."""
    out = []
    for b, index in enumerate(maps):
        tokens = x[b].reshape(-1, x.shape[-1]).tolist()
        out.append(ref.unmerge(tokens, index))
    return torch.tensor(out, dtype=x.dtype).view(len(maps), *grid, x.shape[-1])


# --------------------------------------------------------------------------- TinyViT blocks, by hand


def partition(x: torch.Tensor, window: int):
    """(B, H, W, C) -> (B * nH * nW, window**2, C), zero padding at the bottom/right."""
    B, H, W, C = x.shape
    nH, nW = -(-H // window), -(-W // window)
    padded = x.new_zeros(B, nH * window, nW * window, C)
    padded[:, :H, :W] = x
    tiles = []
    for b in range(B):
        for i in range(nH):
            for j in range(nW):
                tiles.append(padded[b, i * window : (i + 1) * window, j * window : (j + 1) * window].reshape(-1, C))
    return torch.stack(tiles), (nH, nW)


def unpartition(tiles: torch.Tensor, shape: tuple[int, int, int, int], window: int, counts: tuple[int, int]):
    B, H, W, C = shape
    nH, nW = counts
    padded = tiles.new_zeros(B, nH * window, nW * window, C)
    k = 0
    for b in range(B):
        for i in range(nH):
            for j in range(nW):
                padded[b, i * window : (i + 1) * window, j * window : (j + 1) * window] = tiles[k].view(
                    window, window, C
                )
                k += 1
    return padded[:, :H, :W]


def hand_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """timm's TinyViT attention written out: (B', N, C) windows, (heads, N, N) bias."""
    B, N, _ = x.shape
    qkv = attn.qkv(attn.norm(x)).view(B, N, attn.num_heads, -1)
    q, k, v = qkv.split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    logits = (q * attn.key_dim**-0.5) @ k.transpose(-2, -1) + bias
    out = logits.softmax(dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.val_dim))


def hand_block(block, x: torch.Tensor, window: int, bias: torch.Tensor) -> torch.Tensor:
    """A TinyVitBlock on (B, H, W, C) with the given window size and bias."""
    tiles, counts = partition(x, window)
    x = x + unpartition(hand_attention(block.attn, tiles, bias), tuple(x.shape), window, counts)
    y = block.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # the depthwise conv on the grid in force
    return y + block.mlp(y)


def own_bias(attn: Attention) -> torch.Tensor:
    return attn.attention_biases[:, attn.attention_bias_idxs]


def reference_forward(encoder: MiniSamImageEncoder, images: torch.Tensor, windows: str, stages):
    """(neck output, features before the final recovery, the final per-image index maps or None)."""
    plan = {loc: (r_h, r_w) for loc, r_h, r_w in stages}
    x = encoder.patch_embed(images)
    index = 0
    maps, full = None, None  # index maps from the grid before the first reduction, and that grid's size
    for stage in encoder.stages:
        if not isinstance(stage, TinyVitStage):
            x = stage(x)
            continue
        if maps is not None and tuple(stage.downsample.conv2.conv.stride) != (1, 1):
            x = recover_loop(x.permute(0, 2, 3, 1), maps, full).permute(0, 3, 1, 2)
            maps = None
        blocks = list(stage.blocks)
        if maps is None and not any(index <= loc < index + len(blocks) for loc in plan):
            x = stage(x)  # untouched: timm's own forward
            index += len(blocks)
            continue
        x = stage.downsample(x).permute(0, 2, 3, 1)
        window = 0  # a reduced window in force in this stage (0: the blocks' own)
        for block in blocks:
            if index in plan:
                H, W = x.shape[1:3]
                if windows == "window":
                    size = window or block.window_size
                    r_h, r_w = (resolve(amount, size) for amount in plan[index])
                    x, step, window = window_merge_loop(x, size, r_h, r_w)
                else:
                    r_h, r_w = resolve(plan[index][0], H), resolve(plan[index][1], W)
                    x, step = grid_merge_loop(x, r_h, r_w)
                if maps is None:
                    maps, full = step, (H, W)
                else:
                    maps = [ref.compose(first, second) for first, second in zip(maps, step, strict=True)]
            if maps is None:
                x = block(x)  # before any reduction: as it is
            elif window and window != block.window_size:
                x = hand_block(block, x, window, loop_stretched_bias(block.attn, window))
            else:
                x = hand_block(block, x, block.window_size, own_bias(block.attn))
            index += 1
        x = x.permute(0, 3, 1, 2)
    features = x
    if maps is not None:
        x = recover_loop(x.permute(0, 2, 3, 1), maps, full).permute(0, 3, 1, 2)
    return encoder.neck(x), features, maps


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("config", list(CONFIGS))
def test_hand_built_blocks_are_timms_blocks(config):
    """The reference's block (own partition, padding, attention, conv, MLP) is timm's on unreduced grids."""
    encoder = make_encoder(config)
    x = torch.randn(2, 11, 9, encoder.stages[2].blocks[0].dim, generator=torch.Generator().manual_seed(3))
    x = x.double()
    with torch.no_grad():
        for block in encoder.stages[2].blocks:
            assert (hand_block(block, x, block.window_size, own_bias(block.attn)) - block(x)).abs().max() <= 1e-12


def test_loop_window_merge_matches_its_design_on_a_known_case():
    """The loop reference itself: 7-windows of a 9x16 grid (bands 7 + 2 and 7 + 7 + 2) with r = 2."""
    x = torch.randn(1, 9, 16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    merged, maps, window = window_merge_loop(x, 7, 2, 2)
    assert window == 5 and merged.shape == (1, 5 + 1, 5 + 5 + 1, 3)
    slots = [divmod(slot, 11) for slot in maps[0]]
    for t, (sh, sw) in enumerate(slots):
        h, w = divmod(t, 16)
        # every token stays in its own window
        assert (sh // 5, sw // 5) == (h // 7, w // 7)
    assert sorted(set(maps[0])) == list(range(6 * 11))


@pytest.mark.parametrize("case", list(CASES))
def test_cubist_equals_the_hand_built_forward(case):
    config, windows, stages = CASES[case]
    encoder = make_encoder(config)
    images = images_for(config)
    with torch.no_grad():
        expected, features, maps = reference_forward(encoder, images, windows, stages)
        unmerged = encoder(images)
        patched = cubistmerge.patch(make_encoder(config), "cubist", stages=stages, windows=windows, trace_source=True)
        out = patched(images)
        source = patched.cubistmerge_source
    # the merge must move the output far more than the tolerance, or the comparison proves nothing
    assert out.shape == expected.shape == unmerged.shape
    assert (expected - unmerged).abs().max() > 1e-3
    assert (out - expected).abs().max() <= 1e-10
    # trace_source: the map onto the last stage's grid (the identity when it was recovered before a downsampling)
    last = features.shape[-2] * features.shape[-1]
    assert source.tolist() == (maps if maps is not None else [list(range(last))] * len(images))


@pytest.mark.parametrize("case", ["window-stage2-and-stage3", "window-mobile", "grid-stage2-and-stage3"])
def test_features_without_recovery_are_the_reduced_grid(case):
    """recover_output=False: forward_features ends on the reduced grid the last stage worked on."""
    config, windows, stages = CASES[case]
    encoder = make_encoder(config)
    images = images_for(config)
    with torch.no_grad():
        _, expected, maps = reference_forward(encoder, images, windows, stages)
        patched = cubistmerge.patch(
            make_encoder(config), "cubist", stages=stages, windows=windows, recover_output=False
        )
        features = patched.forward_features(images)
    assert maps is not None and features.shape == expected.shape
    assert features.shape[-2:] != (encoder.grid_sizes[-1],) * 2
    assert (features - expected).abs().max() <= 1e-10


def test_window_mode_refuses_non_square_reduced_windows():
    images = images_for("small", batch=1)
    patched = cubistmerge.patch(make_encoder("small"), "cubist", stages=[(3, 1, 2)], windows="window")
    with torch.no_grad(), pytest.raises(ValueError, match="TinyViT windows are square"):
        patched(images)
    # while the whole grid may lose different amounts: that case is in CASES ("grid-stage2-and-stage3")


def test_window_reductions_must_fit_the_reduced_window():
    # stage 3 of "small" has 5-windows: after 5 -> 4 (r = 1) a second r = 3 would be more than half of 4
    with pytest.raises(ValueError, match="inside 4x4 windows"):
        cubistmerge.patch(make_encoder("small"), "cubist", stages=[(5, 1, 1), (6, 3, 3)], windows="window")
    # a new stage starts again from its own window: 8-windows of stage 2 after a reduction in stage 1
    cubistmerge.patch(make_encoder("small"), "cubist", stages=[(0, 3, 3), (3, 4, 4)], windows="window")
