"""ToMe on window-attention encoders (segment_anything, timm samvit, TinyViT) equals a hand-built forward.

There ToMe merges around the MLP only (attention, relative positions and convs need the full grid): in
every block, inside every window-sized tile of the grid, the tokens are matched on the keys of that
block's own attention averaged over heads (ToMe's metric) with the authors' bipartite matching, r per
full tile (an edge tile with n real tokens: floor(r * n / window**2)), the MLP runs on the size-weighted
means, and every token gets its group's MLP output before the residual. The reference below writes that
out per block with loops, from the models' own submodules (their attention modules and qkv Linears).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import cubistmerge

from ..merge import reference as ref

# Tiny float64 models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero biases, relative-position tables and attention-bias tables, so every part matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or "rel_pos" in name or "attention_biases" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def to_windows(grid: torch.Tensor, window: int) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> (B * nH * nW, window, window, C) zero-padded windows, row-major; and nH, nW."""
    B, H, W, C = grid.shape
    n_h, n_w = -(-H // window), -(-W // window)
    padded = grid.new_zeros(B, n_h * window, n_w * window, C)
    padded[:, :H, :W] = grid
    cells = [(i * window, j * window) for i in range(n_h) for j in range(n_w)]
    tiles = [padded[:, top : top + window, left : left + window] for top, left in cells]
    return torch.stack(tiles, dim=1).reshape(B * n_h * n_w, window, window, C), n_h, n_w


def from_windows(windows: torch.Tensor, batch: int, n_h: int, n_w: int, H: int, W: int) -> torch.Tensor:
    window, C = windows.shape[1], windows.shape[-1]
    tiles = windows.reshape(batch, n_h, n_w, window, window, C)
    rows = [torch.cat([tiles[:, i, j] for j in range(n_w)], dim=2) for i in range(n_h)]
    return torch.cat(rows, dim=1)[:, :H, :W]


def tome_mlp_by_loops(normed: torch.Tensor, keys: torch.Tensor, mlp: nn.Module, window: int, r: int) -> torch.Tensor:
    """Merge inside every window-sized tile on ``keys``, run ``mlp`` on the means, copy back to every token."""
    B, H, W, C = normed.shape
    out = None
    for b in range(B):
        for top in range(0, H, window):
            for left in range(0, W, window):
                rows, cols = range(top, min(top + window, H)), range(left, min(left + window, W))
                cells = [(i, j) for i in rows for j in cols]
                n = len(cells)
                r_tile = min(r * n // (window * window), n // 2)
                index = ref.bipartite_matching([keys[b, i, j].tolist() for i, j in cells], r_tile)
                members = [[t for t in range(n) if index[t] == slot] for slot in range(max(index) + 1)]
                means = torch.stack([sum(normed[b, cells[t][0], cells[t][1]] for t in g) / len(g) for g in members])
                computed = mlp(means[None])[0]
                if out is None:
                    out = normed.new_zeros(B, H, W, computed.shape[-1])
                for t, (i, j) in enumerate(cells):
                    out[b, i, j] = computed[index[t]]
    return out


# --------------------------------------------------------------------- segment_anything and timm samvit


def sam_keys(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Keys averaged over heads from the attention's own qkv Linear: (B', h, w, C) -> (B', h, w, d)."""
    B, h, w, _ = x.shape
    qkv = attn.qkv(x.reshape(B, h * w, -1)).reshape(B, h * w, 3, attn.num_heads, -1)
    return qkv[:, :, 1].mean(dim=2).reshape(B, h, w, -1)


def sam_reference(encoder: nn.Module, images: torch.Tensor, schedule: list[int], timm_family: bool) -> torch.Tensor:
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    windows = [block.window_size for block in encoder.blocks if block.window_size]
    tile = windows[0]
    for block, r in zip(encoder.blocks, schedule, strict=True):
        B, H, W, _ = x.shape
        shortcut = x
        y = block.norm1(x)
        if block.window_size:
            parts, n_h, n_w = to_windows(y, block.window_size)
            keys = from_windows(sam_keys(block.attn, parts), B, n_h, n_w, H, W)
            y = from_windows(block.attn(parts), B, n_h, n_w, H, W)
        else:
            keys = sam_keys(block.attn, y)
            y = block.attn(y)
        if timm_family:
            y = block.ls1(y)
        x = shortcut + y
        normed = block.norm2(x)
        if r:
            update = tome_mlp_by_loops(normed, keys, block.mlp, tile, r)
        else:
            update = block.mlp(normed)
        x = x + (block.ls2(update) if timm_family else update)
    return encoder.neck(x.permute(0, 3, 1, 2))


def segment_anything_encoder() -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=160, patch_size=16, embed_dim=48, depth=3, num_heads=3, out_chans=32,
        use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
    )  # fmt: skip
    return randomise(encoder).double().eval()


def timm_sam_encoder() -> nn.Module:
    torch.manual_seed(0)
    encoder = timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=160, depth=3, embed_dim=48, num_heads=3,
        window_size=4, global_attn_indexes=(1,), neck_chans=32, num_classes=0, init_values=0.5,
    )  # fmt: skip
    return randomise(encoder).double().eval()


FAMILIES = {"segment_anything": (segment_anything_encoder, False), "timm samvit": (timm_sam_encoder, True)}
SCHEDULES = [[3, 5, 8], [0, 8, 2], (4, -0.5)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sam_tome_equals_the_hand_built_forward(family, schedule):
    build, timm_family = FAMILIES[family]
    encoder = build()
    # 160 px: a 10x10 grid in 4x4 windows, so the last row and column of windows hold 2 real tokens (padding).
    images = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    per_block = cubistmerge.tome_schedule(schedule, 3)
    with torch.no_grad():
        expected = sam_reference(encoder, images, per_block, timm_family)
        unmerged = encoder.forward_features(images) if timm_family else encoder(images)
        patched = cubistmerge.patch(copy.deepcopy(encoder), "tome", r=schedule)
        out = patched.forward_features(images) if timm_family else patched(images)
    assert (expected - unmerged).abs().max() > 1e-3
    assert (out - expected).abs().max() <= 1e-10


# --------------------------------------------------------------------- TinyViT (MobileSAM's encoder)


def tinyvit_reference(encoder: nn.Module, images: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    x = encoder.patch_embed(images)
    index = 0
    for stage in encoder.stages:
        if not hasattr(stage, "blocks") or not hasattr(stage, "downsample"):
            x = stage(x)
            continue
        x = stage.downsample(x).permute(0, 2, 3, 1)
        for block in stage.blocks:
            r = schedule[index]
            index += 1
            B, H, W, C = x.shape
            parts, n_h, n_w = to_windows(x, block.window_size)
            flat = parts.reshape(parts.shape[0], -1, C)
            attn = block.attn
            qkv = attn.qkv(attn.norm(flat)).view(flat.shape[0], flat.shape[1], attn.num_heads, -1)
            keys = qkv[..., attn.key_dim : 2 * attn.key_dim].mean(dim=2).reshape(parts.shape[0], *parts.shape[1:3], -1)
            keys = from_windows(keys, B, n_h, n_w, H, W)
            out = from_windows(attn(flat).reshape(parts.shape), B, n_h, n_w, H, W)
            x = x + out
            y = block.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            if r:
                update = tome_mlp_by_loops(y, keys, block.mlp, block.window_size, r)
            else:
                update = block.mlp(y)
            x = y + update
        x = x.permute(0, 3, 1, 2)
    return encoder.forward_head(x)


def test_tinyvit_tome_equals_the_hand_built_forward():
    from cubistmerge.models.minisam import MiniSamImageEncoder

    torch.manual_seed(0)
    encoder = MiniSamImageEncoder(img_size=224, depths=(1, 2, 2, 1), window_sizes=(7, 7, 5, 7))
    encoder = randomise(encoder).double().eval()
    encoder.clear_attention_bias_cache()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # attention blocks: 2 on the 28x28 grid (7x7 windows), 2 on 14x14 (5x5 windows: edge windows of 4), 1 on 14x14
    schedule = [6, 0, 10, 3, 20]
    with torch.no_grad():
        expected = tinyvit_reference(encoder, images, schedule)
        unmerged = encoder(images)
        out = cubistmerge.patch(copy.deepcopy(encoder), "tome", r=schedule)(images)
    assert (expected - unmerged).abs().max() > 1e-3
    assert (out - expected).abs().max() <= 1e-10


def test_matching_on_the_tokens_is_not_the_same():
    """The keys matter: matching on the normed tokens instead (the earlier design) gives another output."""
    encoder = timm_sam_encoder()
    images = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def on_tokens(encoder, images, schedule):
        x = encoder.patch_embed(images) + encoder.pos_embed
        for block, r in zip(encoder.blocks, schedule, strict=True):
            B, H, W, _ = x.shape
            y = block.norm1(x)
            if block.window_size:
                parts, n_h, n_w = to_windows(y, block.window_size)
                y = from_windows(block.attn(parts), B, n_h, n_w, H, W)
            else:
                y = block.attn(y)
            x = x + block.ls1(y)
            normed = block.norm2(x)
            x = x + block.ls2(tome_mlp_by_loops(normed, normed, block.mlp, 4, r))
        return encoder.neck(x.permute(0, 3, 1, 2))

    with torch.no_grad():
        by_tokens = on_tokens(encoder, images, [8, 8, 8])
        by_keys = cubistmerge.patch(copy.deepcopy(encoder), "tome", r=8).forward_features(images)
    assert (by_tokens - by_keys).abs().max() > 1e-4


def test_window_helpers_round_trip():
    grid = torch.randn(2, 10, 7, 3)
    parts, n_h, n_w = to_windows(grid, 4)
    assert parts.shape == (2 * 3 * 2, 4, 4, 3)
    assert torch.equal(from_windows(parts, 2, n_h, n_w, 10, 7), grid)
    assert F.pad(grid, (0, 0, 0, 1, 0, 2)).shape == (2, 12, 8, 3)
