"""CubistMerge and ToMe on timm's ``eva.Eva`` family equal a hand-built forward (float64).

Members: DINOv3 and EVA-02 (``EvaBlock`` with ``EvaAttention``), the Perception
Encoder (``AttentionRope``: fused qkv with its own bias, xy-ordered RoPE with
grid offset 1 and a reference grid, pre-transformer norm, attention-pooling
head), EVA-02 with post-norm blocks (``EvaBlockPostNorm``: ``x + norm1(attn(x))``,
``x + norm2(mlp(x))``) and EVA-02 without RoPE.

The reference forward is written out here from the model's own submodules
(norm1, the fused qkv weight and its bias or the q/k/v biases, q/k norm,
attention norm, proj, LayerScale ``gamma_1``/``gamma_2``, norm2, MLP, final
norm, head) and the loop references of ``tests/merge/reference.py``. The rotary embedding of merged
tokens is computed here from the RoPE module's frequencies (``periods`` for
DINOv3, ``bands`` for the ``RotaryEmbeddingCat`` of EVA-02 and PE) and its coordinate
convention, and applied to the queries and keys of the patch tokens only
(class and storage tokens are never rotated). Nothing of ``cubistmerge`` runs
in the reference.

The rules checked (module docstring of ``cubistmerge.patch.timm_eva``):

- CubistMerge ``rope="grid"``: after a reduction to H' x W' every patch token
  gets the RoPE of cell (i, j) of a regular H' x W' grid over the same image
  extent: centre ``(i + 0.5) * H / H' - 0.5`` input rows (likewise columns).
- CubistMerge ``rope="tokens"``: every token sits at the mean (row, col) of
  the original patches it stands for, per image.
- ToMe: the authors' bipartite matching on the attention keys averaged over
  heads, taken after the key bias and q/k norm and BEFORE RoPE (the library
  hooks ``attn.k_norm``), size-weighted merging, proportional attention
  (log size added to the logits), and RoPE of every token at the size-weighted
  mean position of its original patches (carried along here by merging the
  positions like the tokens).

Precision: timm builds every RoPE coordinate grid in float32 (``_build_grid``)
and evaluates sin/cos in the frequency buffer's dtype (float64 here); the
library does the same for merged positions. The reference therefore evaluates
positions and the model's coordinate transform in float32, then angles and
sin/cos in float64, and agrees with the library to 1e-10. With positions in
exact float64 arithmetic the agreement is only ~1e-7 (checked as well).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, RotaryEmbeddingCat, RotaryEmbeddingDinoV3
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

import cubistmerge

from ..merge import reference as ref
from .test_after_attention_reference import weighted_merge_loop

# Small variants of real timm configs, float64, on non-square grids (so rows and columns cannot be swapped).
MODELS = {
    # CLS + 4 storage tokens, DINOv3 RoPE (centred coordinates normalised per axis to [-1, 1], half layout),
    # LayerScale, no qkv bias, average pooling of the patch tokens; 6 x 10 grid.
    "vit_small_patch16_dinov3": dict(img_size=(96, 160), depth=4, embed_dim=64, num_heads=2, init_values=1.0),
    # The same with q/k LayerNorm, class-token pooling and a classifier head.
    "vit_small_patch16_dinov3:qknorm": dict(
        img_size=(96, 160), depth=4, embed_dim=64, num_heads=2, init_values=1.0, qk_norm=True,
        global_pool="token", num_classes=7,
    ),
    # CLS, index RoPE rescaled to ref_feat_shape (16, 16) and cached, interleaved layout, q/k/v biases
    # (the key bias is a buffer), SwiGLU, no LayerScale, fc_norm; 10 x 6 grid.
    "eva02_tiny_patch14_224": dict(img_size=(140, 84), depth=4, embed_dim=64, num_heads=2),
}
# The other members of the family: other attention, other block, no RoPE.
FAMILY_MEMBERS = {
    # Perception Encoder: AttentionRope (fused qkv with a plain bias), CLS, index RoPE with grid offset 1 rescaled
    # to ref_feat_shape (24, 24) in xy channel order, interleaved layout, norm_pre, attention pooling ('map') and a
    # classifier; 6 x 10 grid (non-square, so the xy order matters).
    "vit_pe_core_tiny_patch16_384": dict(img_size=(96, 160), depth=4, embed_dim=64, num_heads=2, num_classes=7),
    # EVA-02 with post-norm blocks: x + norm1(attn(x)), x + norm2(mlp(x)), no LayerScale; 10 x 6 grid.
    "eva02_tiny_patch14_224:postnorm": dict(img_size=(140, 84), depth=4, embed_dim=64, num_heads=2,
                                            use_post_norm=True),
    # EVA-02 without RoPE (absolute position embedding only): merged tokens need no positions; 10 x 6 grid.
    "eva02_tiny_patch14_224:norope": dict(img_size=(140, 84), depth=4, embed_dim=64, num_heads=2,
                                          use_rot_pos_emb=False),
}
ALL_MODELS = [*MODELS, *FAMILY_MEMBERS]
ROPE_MODELS = [key for key in ALL_MODELS if not key.endswith(":norope")]

# CubistMerge reductions: {block: (r_h, r_w)}. DINOv3 6x10 -> 4x8; EVA-02 10x6 -> 8x4; two stages
# 6x10 -> 5x8 -> 4x7 and 10x6 -> 9x4 -> 8x3 (reduced cells of unequal sizes along each axis).
CUBIST_STAGES = {
    "one-stage": {1: (2, 2)},
    "two-stages": {1: (1, 2), 2: (1, 1)},
}

# (r schedule, proportional attention)
TOME_SETTINGS = [(6, True), ([9, 0, 12, 4], True), ((5, -0.5), False)]


# Tiny float64 models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def make_model(key: str) -> Eva:
    """The model, built once per key; read-only (every patch works on a deep copy)."""
    torch.manual_seed(0)
    config = {**MODELS, **FAMILY_MEMBERS}[key]
    model = timm.create_model(key.split(":")[0], pretrained=False, **config).double().eval()
    post_norm = config.get("use_post_norm", False)
    assert all(type(block) is (EvaBlockPostNorm if post_norm else EvaBlock) for block in model.blocks)
    assert all(type(block.attn) is (AttentionRope if key.startswith("vit_pe") else EvaAttention)
               for block in model.blocks)
    assert (model.rope is None) == key.endswith(":norope")
    generator = torch.Generator().manual_seed(1)

    def draw(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma_1", "gamma_2"):  # LayerScale far from 1 and from each other
                tensor.copy_(0.2 + 1.5 * torch.rand(tensor.shape, generator=generator, dtype=torch.float64))
            elif leaf in ("bias", "q_bias", "k_bias", "v_bias"):  # timm zeroes many; EVA's k_bias is a buffer
                tensor.copy_(0.1 * draw(tensor.shape))
            elif name == "head.weight":  # a classifier that reads more than timm's tiny init
                tensor.copy_(draw(tensor.shape))
            elif "norm" in name and leaf == "weight":  # LayerNorm weights (ones at init), q/k norm included
                tensor.copy_(1.0 + 0.2 * draw(tensor.shape))
        for block in model.blocks:
            # Random init attends almost uniformly, so positions would barely count: sharpen q and k.
            dim = block.attn.qkv.weight.shape[0] // 3
            block.attn.qkv.weight[: 2 * dim] *= 3.0
    return model


def images_for(model: Eva, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator, dtype=torch.float64)


def grid_of(model: Eva) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)


# --------------------------------------------------------------------- RoPE, written out


def grid_positions(H: int, W: int) -> torch.Tensor:
    """(H*W, 2) float64 (row, col) patch index of every patch, row-major."""
    return torch.tensor([[h, w] for h in range(H) for w in range(W)], dtype=torch.float64)


def reduced_grid_centres(grid: tuple[int, int], reduced: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """(H'*W', 2) centres of the cells of a regular H' x W' grid over the extent of the H x W grid.

    Cell i spans input rows [i * H / H', (i + 1) * H / H'): centre (i + 0.5) * H / H' - 0.5.
    """
    (H, W), (Hm, Wm) = grid, reduced
    rows = (torch.arange(Hm, dtype=dtype) + 0.5) * (H / Hm) - 0.5
    cols = (torch.arange(Wm, dtype=dtype) + 0.5) * (W / Wm) - 0.5
    return torch.stack([rows[:, None].expand(Hm, Wm), cols[None, :].expand(Hm, Wm)], dim=-1).reshape(Hm * Wm, 2)


def member_means(groups: list[int], grid: tuple[int, int], num_slots: int, dtype=torch.float32) -> torch.Tensor:
    """(num_slots, 2) mean (row, col) of the original patches in every slot; ``groups``: patch -> slot."""
    W = grid[1]
    sums = [[0.0, 0.0] for _ in range(num_slots)]
    counts = [0] * num_slots
    for t, slot in enumerate(groups):
        sums[slot][0] += t // W
        sums[slot][1] += t % W
        counts[slot] += 1
    assert all(counts), "every slot holds an original patch"
    # Sums and counts are small integers (exact in float32): one division, correctly rounded in ``dtype``.
    return torch.tensor(sums, dtype=dtype) / torch.tensor(counts, dtype=dtype)[:, None]


def rope_frame(rope, positions: torch.Tensor, grid: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """(..., 2) patch-index positions on the H x W input grid -> the RoPE module's coordinates.

    As timm's own grids: DINOv3 centres (index + 0.5 + offset) normalised by the side, mapped to [-1, 1];
    ``cat`` RoPE on an index grid: index + offset, rescaled to ``ref_feat_shape``. Evaluated in ``dtype``
    (float32: timm's precision for coordinates).
    """
    positions = positions.to(dtype)
    side = torch.tensor([float(grid[0]), float(grid[1])], dtype=dtype)
    if isinstance(rope, RotaryEmbeddingDinoV3):
        assert rope.normalize_coords == "separate"
        frame = 2.0 * ((positions + 0.5 + rope.grid_offset) / side) - 1.0
    else:
        assert isinstance(rope, RotaryEmbeddingCat) and rope.grid_type == "index"
        frame = positions + rope.grid_offset
        if rope.ref_feat_shape is not None:
            frame = frame / side * torch.tensor([float(s) for s in rope.ref_feat_shape], dtype=dtype)
    return frame.flip(-1) if rope.grid_indexing == "xy" else frame


def rope_from_frame(rope, frame: torch.Tensor) -> torch.Tensor:
    """(..., 2) module coordinates -> (..., 2 * head_dim) [sin | cos], timm's layout.

    Angle of axis a, frequency f: 2 pi c_a / period_f (DINOv3) or c_a * band_f (cat), axis-major; each angle
    fills two channels: (f, f + dim/2) in the half layout, (2f, 2f + 1) interleaved.
    """
    if isinstance(rope, RotaryEmbeddingDinoV3):
        assert rope.periods.dtype == torch.float64
        angles = torch.stack([2 * math.pi * frame[..., a, None].double() / rope.periods for a in (0, 1)], dim=-2)
    else:
        assert rope.bands.dtype == torch.float64
        angles = torch.stack([frame[..., a, None].double() * rope.bands for a in (0, 1)], dim=-2)
    angles = angles.flatten(-2)
    if rope.rotate_half:
        angles = torch.cat([angles, angles], dim=-1)
    else:
        angles = torch.stack([angles, angles], dim=-1).flatten(-2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rope_at(rope, positions: torch.Tensor, grid: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    return rope_from_frame(rope, rope_frame(rope, positions, grid, dtype))


def rotate(t: torch.Tensor, embedding: torch.Tensor, half: bool) -> torch.Tensor:
    """RoPE: rotate every channel pair of ``t`` (..., N, d) by its angle; ``embedding`` (..., N, 2d) = [sin | cos]."""
    sin, cos = embedding.chunk(2, dim=-1)
    if half:
        first, second = t.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    else:
        turned = torch.stack([-t[..., 1::2], t[..., 0::2]], dim=-1).flatten(-2)
    return t * cos + turned * sin


# --------------------------------------------------------------------- the block, written out


def qkv_bias(attn) -> torch.Tensor | None:
    """EvaAttention: the q/k/v biases (the key bias a buffer), the Linear bias-free; AttentionRope: the Linear's."""
    if isinstance(attn, EvaAttention):
        assert attn.qkv.bias is None and not attn.qkv_bias_separate
        return None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    assert isinstance(attn, AttentionRope) and attn.num_kv_groups == 1
    return attn.qkv.bias


def hand_attention(attn, x, rope, p: int, log_size, rotate_prefix: bool = False):
    """EvaAttention / AttentionRope by hand; returns (output, keys (B, heads, N, d) after the k bias and k_norm,
    before RoPE). Both split the fused projection as (3, heads, head_dim) and rotate q and k of the patch tokens."""
    assert attn.qkv is not None and attn.gate is None
    B, N, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, qkv_bias(attn)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    keys = k
    if rope is not None:
        start = 0 if rotate_prefix else p  # rotate_prefix: a wrong reference, to show the tests can tell
        if rotate_prefix:
            rope = torch.cat([rope[..., :1, :].expand(*rope.shape[:-2], p, rope.shape[-1]), rope], dim=-2)
        q = torch.cat([q[:, :, :start], rotate(q[:, :, start:], rope, attn.rotate_half)], dim=2)
        k = torch.cat([k[:, :, :start], rotate(k[:, :, start:], rope, attn.rotate_half)], dim=2)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if log_size is not None:  # proportional attention
        logits = logits + log_size[:, None, None, :]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(attn.norm(out)), keys


def attention_residual(block, x, rope, p, log_size=None, rotate_prefix=False):
    """Pre-norm: x + gamma_1 * attn(norm1(x)); post-norm: x + norm1(attn(x))."""
    if isinstance(block, EvaBlockPostNorm):
        out, keys = hand_attention(block.attn, x, rope, p, log_size, rotate_prefix)
        return x + block.norm1(out), keys
    out, keys = hand_attention(block.attn, block.norm1(x), rope, p, log_size, rotate_prefix)
    if block.gamma_1 is not None:
        out = block.gamma_1 * out
    return x + out, keys


def mlp_residual(block, x):
    """Pre-norm: x + gamma_2 * mlp(norm2(x)); post-norm: x + norm2(mlp(x))."""
    if isinstance(block, EvaBlockPostNorm):
        return x + block.norm2(block.mlp(x))
    out = block.mlp(block.norm2(x))
    if block.gamma_2 is not None:
        out = block.gamma_2 * out
    return x + out


def embed(model: Eva, images: torch.Tensor):
    """Tokens after the embedding and the model's own RoPE for the input grid."""
    x, own_rope = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(x), own_rope


def recovered(x: torch.Tensor, groups: list[list[int]], p: int) -> torch.Tensor:
    """Final tokens -> the original layout: prefix tokens as they are, every patch its slot's token."""
    return torch.stack([torch.cat([x[b, :p], x[b, p:][groups[b]]]) for b in range(len(x))])


def with_prefix(groups: list[list[int]], p: int) -> list[list[int]]:
    return [list(range(p)) + [p + slot for slot in g] for g in groups]


# --------------------------------------------------------------------- CubistMerge reference


def cubist_reference(model: Eva, images: torch.Tensor, stages: dict, rope_mode: str, dtype=torch.float32,
                     rotate_prefix: bool = False, grid_shift: float = 0.0):
    """(logits, recovered features, (B, N) source map) of CubistMerge with ``rope_mode`` placement.

    ``rotate_prefix`` and ``grid_shift`` (added to the reduced-grid centres) make wrong references, to show
    that the tests can tell.
    """
    p, grid = model.num_prefix_tokens, grid_of(model)
    B = len(images)
    with torch.no_grad():
        x, own_rope = embed(model, images)
        C = x.shape[-1]
        current = grid
        groups = [list(range(grid[0] * grid[1])) for _ in range(B)]  # original patch -> current slot
        rope, reduced = None, False
        for i, block in enumerate(model.blocks):
            if i in stages:
                r_h, r_w = stages[i]
                patches = x[:, p:].reshape(B, *current, C).tolist()
                results = [ref.cubist_merge_image(image, r_h, r_w) for image in patches]
                current = (current[0] - r_h, current[1] - r_w)
                merged = torch.tensor([values for values, _ in results], dtype=x.dtype).reshape(B, -1, C)
                x = torch.cat([x[:, :p], merged], dim=1)  # prefix tokens untouched
                groups = [ref.compose(groups[b], results[b][1]) for b in range(B)]
                reduced = True
                if model.rope is None:  # no RoPE: merged tokens need no positions, whatever the mode
                    rope = None
                elif rope_mode == "grid":  # one embedding for the batch
                    centres = reduced_grid_centres(grid, current, dtype) + grid_shift
                    rope = rope_at(model.rope, centres, grid, dtype)
                else:
                    slots = current[0] * current[1]
                    means = [member_means(groups[b], grid, slots, dtype) for b in range(B)]
                    rope = torch.stack([rope_at(model.rope, m, grid, dtype) for m in means]).unsqueeze(1)
            if not reduced:  # before the first reduction: the model's own block
                x = block(x, rope=own_rope)
            else:
                x = mlp_residual(block, attention_residual(block, x, rope, p, rotate_prefix=rotate_prefix)[0])
        out = model.norm(x)
        return model.forward_head(out), recovered(out, groups, p), with_prefix(groups, p)


def run_cubist(model: Eva, images: torch.Tensor, stages: dict, rope_mode: str):
    patched = cubistmerge.patch(
        copy.deepcopy(model), "cubist", stages=[(loc, *r) for loc, r in stages.items()], rope=rope_mode,
        trace_source=True,
    )
    with torch.no_grad():
        logits = patched(images)
        features = patched.forward_features(images)
    return logits, features, patched.cubistmerge_source.tolist()


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("key", ALL_MODELS)
def test_hand_built_blocks_are_the_models_own(key):
    """Without merging, the written-out blocks (pre- or post-norm residuals, EvaAttention or AttentionRope, the
    rotation, or none) reproduce the model's own blocks given the model's own RoPE (the reference's RoPE is
    checked against it separately); the other residual order (pre-norm for post-norm blocks and vice versa)
    does not."""
    model = make_model(key)
    images = images_for(model)
    p = model.num_prefix_tokens
    with torch.no_grad():
        x, rope = embed(model, images)
        assert (rope is None) == (model.rope is None)
        for block in model.blocks:
            expected = block(x, rope=rope)
            ours = mlp_residual(block, attention_residual(block, x, rope, p)[0])
            assert gap(ours, expected) <= 1e-10
            post = isinstance(block, EvaBlockPostNorm)
            if post:  # the same modules in pre-norm order
                out = x + hand_attention(block.attn, block.norm1(x), rope, p, None)[0]
                other = out + block.mlp(block.norm2(out))
            else:  # the same modules in post-norm order
                out = x + block.norm1(hand_attention(block.attn, x, rope, p, None)[0])
                other = out + block.norm2(block.mlp(out))
            assert gap(other, expected) > 1e-2
            x = expected
        assert gap(model.forward_head(model.norm(x)), model(images)) <= 1e-12


@pytest.mark.parametrize("rope_mode", ["grid", "tokens"])
@pytest.mark.parametrize("stages", list(CUBIST_STAGES))
@pytest.mark.parametrize("key", ALL_MODELS)
def test_cubist_equals_the_hand_built_forward(key, stages, rope_mode):
    """Without RoPE (":norope") the reference is the same for both modes: the option must change nothing."""
    model = make_model(key)
    images = images_for(model)
    plan = CUBIST_STAGES[stages]
    logits, features, source = run_cubist(model, images, plan, rope_mode)
    expected_logits, expected_features, expected_source = cubist_reference(model, images, plan, rope_mode)
    with torch.no_grad():
        unmerged_logits, unmerged_features = model(images), model.forward_features(images)
    # The merge must matter far more than the tolerance, or the comparison proves nothing.
    assert gap(expected_logits, unmerged_logits) > 1e-3 and gap(expected_features, unmerged_features) > 1e-2
    assert gap(logits, expected_logits) <= 1e-10
    assert gap(features, expected_features) <= 1e-10
    assert source == expected_source


@pytest.mark.parametrize("key", ROPE_MODELS)
def test_cubist_rope_placement_is_what_the_reference_tells_apart(key):
    """Each wrong placement of the reference moves the features far beyond the 1e-10 tolerance: the other
    mode, RoPE on the prefix tokens too, reduced-grid centres shifted by half a cell."""
    model = make_model(key)
    images = images_for(model)
    plan = CUBIST_STAGES["two-stages"]
    _, grid_features, _ = cubist_reference(model, images, plan, "grid")
    _, tokens_features, _ = cubist_reference(model, images, plan, "tokens")
    _, prefix_features, _ = cubist_reference(model, images, plan, "grid", rotate_prefix=True)
    _, shifted_features, _ = cubist_reference(model, images, plan, "grid", grid_shift=0.5)
    _, features, _ = run_cubist(model, images, plan, "grid")
    for wrong in (tokens_features, prefix_features, shifted_features):
        assert gap(grid_features, wrong) > 1e-4 and gap(features, wrong) > 1e-4
    p = model.num_prefix_tokens
    assert gap(grid_features[:, :p], tokens_features[:, :p]) > 1e-4  # prefix tokens see the patches' positions


@pytest.mark.parametrize("rope_mode", ["grid", "tokens"])
@pytest.mark.parametrize("key", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224", "vit_pe_core_tiny_patch16_384"])
def test_cubist_positions_in_exact_arithmetic_differ_by_rounding_only(key, rope_mode):
    """With positions in float64 arithmetic (not timm's float32 grids) only float32 rounding remains."""
    model = make_model(key)
    images = images_for(model)
    plan = CUBIST_STAGES["two-stages"]
    _, features, _ = run_cubist(model, images, plan, rope_mode)
    _, exact, _ = cubist_reference(model, images, plan, rope_mode, dtype=torch.float64)
    assert 0 < gap(features, exact) <= 1e-5


# --------------------------------------------------------------------- the reference's RoPE vs the model's own


@pytest.mark.parametrize("key", ROPE_MODELS)
def test_reference_rope_is_the_models_own_on_the_input_grid(key):
    model = make_model(key)
    H, W = grid_of(model)
    with torch.no_grad():
        own = embed(model, images_for(model))[1]  # what the blocks get without merging
    ours = rope_at(model.rope, grid_positions(H, W), (H, W))
    assert ours.shape == own.shape == (H * W, 2 * model.blocks[0].attn.head_dim)
    if isinstance(model.rope, RotaryEmbeddingDinoV3):
        assert gap(ours, model.rope.get_embed(shape=[H, W])) <= 1e-12
        assert gap(ours, own) <= 1e-12
    else:  # EVA-02 and PE cache their embedding, computed in float32 when the model is built
        assert gap(ours, model.rope.get_embed()) <= 1e-6
        assert gap(ours, own) <= 1e-6
    for block in model.blocks:
        assert block.attn.num_prefix_tokens == model.num_prefix_tokens
        assert block.attn.rotate_half == model.rope.rotate_half


@pytest.mark.parametrize(("grid", "reduced"), [((6, 10), (4, 8)), ((6, 10), (5, 7)), ((14, 14), (13, 11))])
def test_dinov3_grid_rope_is_the_models_rope_for_the_reduced_image(grid, reduced):
    """DINOv3 (coordinates normalised per axis): the same-extent reduced grid is the model's own H' x W' grid."""
    model = make_model("vit_small_patch16_dinov3")
    ours = rope_at(model.rope, reduced_grid_centres(grid, reduced), grid)
    assert gap(ours, model.rope.get_embed(shape=list(reduced))) <= 1e-6


# --------------------------------------------------------------------- ToMe reference


def tome_reference(model: Eva, images: torch.Tensor, schedule, prop_attn: bool, metric: str = "keys",
                   dtype=torch.float32):
    """(logits, recovered features, (B, N) source map) of ToMe.

    ``metric``: "keys" (keys averaged over heads, before RoPE: the method), or wrong ones to show the tests
    can tell: "tokens" (the block's output tokens), "rotated" (keys after RoPE).
    """
    p, grid = model.num_prefix_tokens, grid_of(model)
    B = len(images)
    per_block = cubistmerge.tome_schedule(schedule, len(model.blocks))
    with torch.no_grad():
        x, rope = embed(model, images)
        N = x.shape[1]
        sizes = [[1.0] * N for _ in range(B)]
        # Position of every token, carried along through the size-weighted merges (prefix rows unused).
        positions = torch.cat([torch.zeros(p, 2, dtype=torch.float64), grid_positions(*grid)]).expand(B, N, 2)
        groups = [list(range(N)) for _ in range(B)]
        merged_yet = False
        for i, block in enumerate(model.blocks):
            log_size = torch.tensor(sizes, dtype=x.dtype).log() if prop_attn and merged_yet else None
            x, keys = attention_residual(block, x, rope, p, log_size)
            r = min(per_block[i], (x.shape[1] - p) // 2)
            if r:
                if metric == "keys":
                    score = keys.mean(dim=1)
                elif metric == "tokens":
                    score = x
                else:
                    score = torch.cat([keys[:, :, :p], rotate(keys[:, :, p:], rope, block.attn.rotate_half)], 2)
                    score = score.mean(dim=1)
                index = [ref.bipartite_matching(score[b].tolist(), r, p) for b in range(B)]
                x, new_sizes = weighted_merge_loop(x, sizes, index)
                positions, _ = weighted_merge_loop(positions, sizes, index)
                sizes = new_sizes
                groups = [ref.compose(groups[b], index[b]) for b in range(B)]
                merged_yet = True
                # Every patch token at its size-weighted mean position (float32, as timm's grids).
                if model.rope is not None:
                    rope = rope_at(model.rope, positions[:, p:], grid, dtype).unsqueeze(1)
            x = mlp_residual(block, x)
        out = model.norm(x)
        return model.forward_head(out), recovered(out, [[s - p for s in g[p:]] for g in groups], p), groups


def run_tome(model: Eva, images: torch.Tensor, schedule, prop_attn: bool):
    patched = cubistmerge.patch(copy.deepcopy(model), "tome", r=schedule, prop_attn=prop_attn, trace_source=True)
    with torch.no_grad():
        logits = patched(images)
        features = patched.forward_features(images)
    return logits, features, patched.cubistmerge_source.tolist()


@pytest.mark.parametrize(("schedule", "prop_attn"), TOME_SETTINGS, ids=str)
@pytest.mark.parametrize("key", ALL_MODELS)
def test_tome_equals_the_hand_built_forward(key, schedule, prop_attn):
    model = make_model(key)
    images = images_for(model)
    logits, features, source = run_tome(model, images, schedule, prop_attn)
    expected_logits, expected_features, expected_source = tome_reference(model, images, schedule, prop_attn)
    with torch.no_grad():
        unmerged = model(images)
    assert gap(expected_logits, unmerged) > 1e-3
    assert gap(logits, expected_logits) <= 1e-10
    assert gap(features, expected_features) <= 1e-10
    assert source == expected_source


@pytest.mark.parametrize("key", ALL_MODELS)
def test_tome_matches_on_the_keys_before_rope(key):
    """Matching on the tokens, or on the keys after RoPE, merges other tokens than the library does."""
    model = make_model(key)
    images = images_for(model)
    schedule = [9, 0, 12, 4]
    logits, _, source = run_tome(model, images, schedule, True)
    for wrong in ("tokens", "rotated") if model.rope is not None else ("tokens",):
        other_logits, _, other_source = tome_reference(model, images, schedule, True, metric=wrong)
        assert other_source != source
        assert gap(other_logits, logits) > 1e-4


@pytest.mark.parametrize("key", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224", "vit_pe_core_tiny_patch16_384"])
def test_tome_positions_in_exact_arithmetic_differ_by_rounding_only(key):
    model = make_model(key)
    images = images_for(model)
    logits, features, source = run_tome(model, images, 6, True)
    exact_logits, exact_features, exact_source = tome_reference(model, images, 6, True, dtype=torch.float64)
    assert exact_source == source
    assert 0 < gap(features, exact_features) <= 1e-5
