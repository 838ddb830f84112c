"""cubistmerge.patch(model, "expedite") equals a hand-built forward of Expedite on tiny timm ViTs and SAM encoders.

The reference forwards below are written out in the test from the model's own
submodules (qkv / proj Linears, norms, MLPs, LayerScale, the neck, and the
family's own ``get_rel_pos`` for SAM's relative positions), in float64:

- plain ViT: embedding, blocks before ``loc`` unchanged, at ``loc`` the patch
  grid is clustered by the loop reference of
  ``tests/merge/test_expedite_reference.py`` (prefix tokens pass through),
  later blocks run on the clustered tokens, and before the final norm every
  patch is rebuilt as the weighted sum of the final clustered tokens (weights
  from the clustering layer), then the model's norm and head;
- SAM (timm ``samvit`` and ``segment_anything.ImageEncoderViT``): before block
  ``loc`` every attention window is clustered on its own (edge windows in
  proportion, padding excluded: the library's documented choice), windowed
  blocks then run with the smaller window, partitioned / zero-padded /
  attended / cropped by hand here, global blocks on the whole clustered grid
  (relative-position tables resized by the family's ``get_rel_pos``), and every
  token is rebuilt from its window's clustered tokens before the neck.

Every parameter that is zero or one at init (biases, LayerScale gammas,
position embeddings, relative-position tables) is randomised, and each test
also checks that the clustering moves the output by far more than the 1e-10
agreement.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import get_rel_pos as sa_get_rel_pos
from timm.models.vision_transformer_sam import get_rel_pos as timm_get_rel_pos
from torch import nn

import cubistmerge

from ..merge import test_expedite_reference as eref

TOL = 1e-10
DEFAULTS = dict(neighbourhood=5, iterations=5, temperature=0.01, k=20, normalise="sum")


# Tiny float64 models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every parameter that starts at 0 or 1 (or nearly) well away from it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            shape = parameter.shape
            if name.endswith(".gamma"):  # LayerScale
                parameter.copy_(0.2 + 1.5 * torch.rand(shape, generator=generator, dtype=torch.float64))
            elif name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn(shape, generator=generator, dtype=torch.float64))
            elif name == "pos_embed":  # large enough for squared token distances of a few hundred
                parameter.copy_(2.0 * torch.randn(shape, generator=generator, dtype=torch.float64))
            elif "rel_pos" in name or name in ("cls_token", "reg_token"):
                parameter.copy_(0.5 * torch.randn(shape, generator=generator, dtype=torch.float64))
            elif parameter.dim() == 1:  # norm weights (LayerNorm, LayerNorm2d)
                parameter.copy_(1.0 + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64))
    return model


def images_for(img_size: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, img_size, img_size, generator=generator, dtype=torch.float64)


def cluster_batch(x: torch.Tensor, out, window: int, settings: dict):
    """Loop-reference clustering of a (B, H, W, C) grid: the clustered grid and per-image weight lists.

    ``window`` > 0 clusters every window to ``out`` (an int) per side; 0
    clusters the whole grid to ``out`` = (h, w).
    """
    merged, weights = [], []
    for b in range(x.shape[0]):
        grid = x[b].tolist()
        if window:
            centres, wts = eref.cluster_image_windows(grid, window, out, **settings)
        else:
            h, w = out
            flat, wts = eref.cluster_image(grid, h, w, **settings)
            centres = [flat[a * w : (a + 1) * w] for a in range(h)]
        merged.append(centres)
        weights.append(wts)
    return torch.tensor(merged, dtype=x.dtype), weights


def rebuild(weights: list, tokens: torch.Tensor) -> torch.Tensor:
    """(B, M, C) clustered tokens -> (B, N, C): every token the weighted sum of clustered tokens (loops)."""
    rows = [eref.apply_weights(weights[b], tokens[b].tolist()) for b in range(len(weights))]
    return torch.tensor(rows, dtype=tokens.dtype)


# --------------------------------------------------------------------------- plain ViTs

VITS = {
    # 6x6 grid, class token, LayerScale
    "vit_tiny_patch16_224": dict(img_size=96, depth=4, embed_dim=32, num_heads=2, init_values=0.5),
    # 7x7 grid, class token + 4 registers, LayerScale
    "vit_small_patch14_reg4_dinov2": dict(img_size=98, depth=4, embed_dim=32, num_heads=2, init_values=0.5),
    # 7x7 grid, no prefix, average pooling with fc_norm after it (the final norm is the identity)
    "vit_tiny_patch16_224:gap": dict(
        img_size=112, depth=4, embed_dim=32, num_heads=2, class_token=False, global_pool="avg", init_values=0.5
    ),
}


def make_vit(key: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(key.split(":")[0], pretrained=False, **VITS[key]).double().eval()
    return randomise(model)


def hand_vit_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(attn.norm(out))


def hand_vit(model: nn.Module, images: torch.Tensor, loc: int, out_hw: tuple[int, int], settings: dict):
    """(logits, final features) of Expedite on a timm ViT, written out."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B, _, C = x.shape
    p = model.num_prefix_tokens
    H, W = model.patch_embed.grid_size
    weights = None
    for i, block in enumerate(model.blocks):
        if i == loc:
            clustered, weights = cluster_batch(x[:, p:].reshape(B, H, W, C), out_hw, 0, settings)
            x = torch.cat([x[:, :p], clustered.reshape(B, -1, C)], dim=1)
        x = x + block.ls1(hand_vit_attention(block.attn, block.norm1(x)))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    if weights is not None:
        x = torch.cat([x[:, :p], rebuild(weights, x[:, p:])], dim=1)
    features = model.norm(x)
    return model.forward_head(features), features


# (model, r, loc, clustered grid, settings)
VIT_CASES = {
    "tiny_defaults": ("vit_tiny_patch16_224", 2, 1, (4, 4), {}),
    "tiny_l2": ("vit_tiny_patch16_224", 2, 1, (4, 4), dict(normalise="l2")),
    "tiny_loc0_rect": (
        "vit_tiny_patch16_224",
        (1, 3),
        0,
        (5, 3),
        dict(neighbourhood=3, iterations=2, temperature=0.05, k=5),
    ),
    "tiny_last_block": ("vit_tiny_patch16_224", 2, 3, (4, 4), dict(k=3, temperature=0.1)),
    "reg4_defaults": ("vit_small_patch14_reg4_dinov2", 2, 1, (5, 5), {}),
    "reg4_fraction_hard": (
        "vit_small_patch14_reg4_dinov2",
        0.5,
        2,
        (3, 3),
        dict(temperature=1.0, iterations=3, k=4, normalise="l2"),
    ),
    "gap_defaults": ("vit_tiny_patch16_224:gap", 3, 1, (4, 4), {}),
    "gap_l2": ("vit_tiny_patch16_224:gap", 3, 1, (4, 4), dict(normalise="l2", neighbourhood=3, k=6)),
}


@pytest.mark.parametrize("case", list(VIT_CASES))
def test_vit_expedite_equals_hand_built_forward(case):
    key, r, loc, out_hw, options = VIT_CASES[case]
    settings = DEFAULTS | options
    model = make_vit(key)
    images = images_for(model.patch_embed.img_size[0])
    with torch.no_grad():
        expected, expected_features = hand_vit(model, images, loc, out_hw, settings)
        unpatched = model(images)
        patched = cubistmerge.patch(copy.deepcopy(model), "expedite", r=r, loc=loc, **options)
        logits, features = patched(images), patched.forward_features(images)
    # The clustering must matter far more than the tolerance, or the comparison proves nothing
    # (the logits of a class-token model move less: only the class token reads the clustered grid).
    assert (expected_features - model.forward_features(images)).abs().max() > 1e-3
    assert (expected - unpatched).abs().max() > 1e-6
    assert (logits - expected).abs().max() <= TOL
    assert (features - expected_features).abs().max() <= TOL


def test_vit_clustering_settings_matter():
    """Each setting the reference reads changes the features far beyond the tolerance (so the tests above bite).

    (The class token's logits do not see the reconstruction at all: it runs after the last block.)
    """
    model = make_vit("vit_tiny_patch16_224")
    images = images_for(96)
    with torch.no_grad():
        _, base = hand_vit(model, images, 1, (4, 4), DEFAULTS)
        for change in (dict(neighbourhood=3), dict(iterations=2), dict(temperature=0.02), dict(k=4)):
            _, other = hand_vit(model, images, 1, (4, 4), DEFAULTS | change)
            assert (other - base).abs().max() > 1e-4, change


# --------------------------------------------------------------------------- SAM encoders

IMG = 160  # 10x10 grid
KINDS = ["timm", "segment_anything"]


def make_sam(kind: str, window: int) -> nn.Module:
    torch.manual_seed(0)
    config = dict(depth=4, embed_dim=32, num_heads=2, window_size=window)
    if kind == "timm":
        model = timm.create_model(
            "samvit_base_patch16",
            pretrained=False,
            img_size=IMG,
            global_attn_indexes=[1, 3],
            neck_chans=16,
            num_classes=0,
            init_values=0.5,
            **config,
        )
    else:
        model = ImageEncoderViT(img_size=IMG, use_rel_pos=True, global_attn_indexes=(1, 3), out_chans=16, **config)
    return randomise(model.double().eval())


def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_features(images) if hasattr(model, "forward_features") else model(images)


def hand_sam_attention(attn: nn.Module, x: torch.Tensor, get_rel_pos) -> torch.Tensor:
    """SAM attention on a (B, h, w, C) grid: decomposed relative positions added to the logits."""
    B, h, w, C = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x.reshape(B, h * w, C)).reshape(B, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    d = q.shape[-1]
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q.reshape(B, heads, h, w, d), get_rel_pos(h, h, attn.rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q.reshape(B, heads, h, w, d), get_rel_pos(w, w, attn.rel_pos_w))
    logits = logits.reshape(B, heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
    out = (logits.reshape(B, heads, h * w, h * w).softmax(dim=-1) @ v).transpose(1, 2).reshape(B, h * w, -1)
    return attn.proj(out).reshape(B, h, w, -1)


def hand_sam_block(block: nn.Module, x: torch.Tensor, window: int, get_rel_pos) -> torch.Tensor:
    """One SAM block with attention windows of ``window`` (0: global): zero-pad, attend, crop, residuals."""
    B, H, W, C = x.shape
    ls1 = getattr(block, "ls1", nn.Identity())
    ls2 = getattr(block, "ls2", nn.Identity())
    y = block.norm1(x)
    if window:
        out = torch.empty_like(y)
        for r0 in range(0, H, window):
            for c0 in range(0, W, window):
                piece = y[:, r0 : r0 + window, c0 : c0 + window]
                eh, ew = piece.shape[1:3]
                padded = y.new_zeros(B, window, window, C)
                padded[:, :eh, :ew] = piece
                out[:, r0 : r0 + eh, c0 : c0 + ew] = hand_sam_attention(block.attn, padded, get_rel_pos)[:, :eh, :ew]
    else:
        out = hand_sam_attention(block.attn, y, get_rel_pos)
    x = x + ls1(out)
    return x + ls2(block.mlp(block.norm2(x)))


def hand_sam(model: nn.Module, kind: str, images: torch.Tensor, loc: int, out, settings: dict, windows_after=None):
    """Expedite on a SAM encoder, written out; ``windows_after`` overrides the window size after clustering."""
    get_rel_pos = timm_get_rel_pos if kind == "timm" else sa_get_rel_pos
    x = model.patch_embed(images) + model.pos_embed
    if kind == "timm":
        x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    B, H, W, C = x.shape
    window = max(block.window_size for block in model.blocks)
    current, weights = window, None
    for i, block in enumerate(model.blocks):
        if i == loc:
            x, weights = cluster_batch(x, out, window, settings)
            current = out if window else 0
            if windows_after is not None:
                current = windows_after
        x = hand_sam_block(block, x, current if block.window_size else 0, get_rel_pos)
    if weights is not None:
        x = rebuild(weights, x.reshape(B, -1, C)).reshape(B, H, W, C)
    return model.neck(x.permute(0, 3, 1, 2))


# (window, r, loc, clustered window (or grid without windows), settings)
SAM_CASES = {
    # windows 4 + 4 + 2 -> 3 + 3 + 2 (edge: round(1.5) = 2)
    "w4_r1": (4, 1, 1, 3, {}),
    # 4 + 4 + 2 -> 2 + 2 + 1, clustering before the first block
    "w4_r2_loc0": (4, 2, 0, 2, dict(neighbourhood=3, iterations=3, temperature=0.05, k=3)),
    # windows 5 + 5 -> 3 + 3, clustering before the last windowed block
    "w5_r2_loc2_l2": (5, 2, 2, 3, dict(temperature=0.1, k=4, normalise="l2")),
    # 6 + 4 -> 4 + round(2.67) = 3, hard assignments
    "w6_r2_hard": (6, 2, 1, 4, dict(temperature=1.0, k=5)),
    # no windowed blocks: the whole 10x10 grid -> 7x6
    "global": (0, (3, 4), 1, (7, 6), dict(k=8)),
}


@pytest.mark.parametrize("case", list(SAM_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_sam_expedite_equals_hand_built_forward(kind, case):
    window, r, loc, out, options = SAM_CASES[case]
    settings = DEFAULTS | options
    model = make_sam(kind, window)
    images = images_for(IMG)
    with torch.no_grad():
        expected = hand_sam(model, kind, images, loc, out, settings)
        unpatched = encode(model, images)
        patched = cubistmerge.patch(copy.deepcopy(model), "expedite", r=r, loc=loc, **options)
        result = encode(patched, images)
    assert result.shape == unpatched.shape == (2, 16, 10, 10)
    assert (expected - unpatched).abs().max() > 1e-3
    assert (result - expected).abs().max() <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_sam_window_size_after_clustering_matters(kind):
    """Keeping the original window (4) on the 8x8 clustered grid instead of 3 changes the output far beyond TOL."""
    model = make_sam(kind, 4)
    images = images_for(IMG)
    with torch.no_grad():
        right = hand_sam(model, kind, images, 1, 3, DEFAULTS)
        wrong = hand_sam(model, kind, images, 1, 3, DEFAULTS, windows_after=4)
    assert (right - wrong).abs().max() > 1e-3
