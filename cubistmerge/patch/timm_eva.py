"""Patching timm's EVA family (``eva.Eva``): EVA-02, DINOv3, Perception Encoder and other RoPE ViTs.

The model's class is swapped for a subclass that overrides only
``forward_features`` and ``forward_intermediates``; the embedding (including
the model's own RoPE for the input grid), the blocks, the norm and the head are
the model's own modules, called as they are.

RoPE is what makes this family differ from the plain ViT. ``Eva`` computes one
rotary embedding per forward, for the patch grid (prefix tokens, i.e. class and
register/storage tokens, are never rotated: every attention skips its first
``num_prefix_tokens``), and hands it to every block. Until the first merge the
blocks get exactly that embedding. After a merge the tokens no longer sit on
the input grid, so the later blocks get an embedding for the merged tokens,
evaluated with the model's own RoPE frequencies and coordinate convention:

- CubistMerge, ``rope="grid"`` (default, the paper's choice): the RoPE of a
  regular H' x W' grid spanning the same image extent as the input grid. Cell
  ``i`` of the reduced grid is centred at ``(i + 0.5) * H / H' - 0.5`` input
  patch rows (likewise for columns), expressed in the model's coordinates of
  the input grid. DINOv3 normalises cell centres to [-1, 1] per axis, so this
  is exactly the embedding the model itself computes for an image whose grid
  is H' x W' (tested). (With DINOv3's optional "min"/"max" normalisation by one
  side, the extent is still kept, which the model's own H' x W' embedding does
  not do when the two axes shrink by different factors.) EVA-02 and PE use
  patch indices, rescaled to a reference grid ``ref_feat_shape`` when set;
  there the model's own embedding for an H' x W' image would span a smaller
  extent (no reference grid: spacing 1, i.e. a crop) or start at the first row
  instead of being centred (a constant shift), so the centred same-extent grid
  is used for every model. One embedding (N', dim) serves the whole batch.
- CubistMerge, ``rope="tokens"``: every merged token is placed at the mean
  (h, w) of the original patches it stands for, per image; the embedding then
  has shape (B, 1, N', dim).
- ToMe: always per token, at the size-weighted mean position of each merged
  token (which equals the mean over its original patches), so ToMe never runs
  with positions that do not belong to its tokens.

Per-image embeddings of shape (B, 1, N', dim) are what ``Eva`` itself passes to
the blocks after patch dropout; the attention modules (``EvaAttention``,
``AttentionRope``) apply them with the same ``apply_rot_embed_cat`` call and
broadcasting over heads, so their code path (q/k norm, fused attention, GQA) is
unchanged.

Merged positions are fractional; the embedding is evaluated in closed form
from the RoPE module's frequencies (``periods`` for DINOv3, ``bands`` for the
``cat`` RoPE) and its coordinate settings (normalisation, offset, reference
grid, ij/xy channel order, half/interleaved layout). At the original integer
positions this reproduces the model's own embedding (tested).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import timm.layers
import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch.utils.checkpoint import checkpoint

from ._after_attention import merge_after_attention
from ._swap import options_of, restore_class, swap_class
from ._tokens import captured_keys, format_intermediates, patch_grid, start_state, store_source
from .options import CubistOptions, ToMeOptions
from .state import MergeState
from .timm_vit import cubist_reduce_at

FAMILY = "timm Eva (EVA-02, DINOv3, PE: timm.models.eva.Eva)"

ROPE_MODES = ("grid", "tokens")
DEFAULT_ROPE_MODE = "grid"
FAMILY_OPTIONS = {"cubist": ("rope",)}

# Optional in older timm releases: looked up by name so that importing this module never fails.
_AttentionRope = getattr(timm.layers, "AttentionRope", None)
_RopeCat = getattr(timm.layers, "RotaryEmbeddingCat", None)
_RopeDinoV3 = getattr(timm.layers, "RotaryEmbeddingDinoV3", None)

_BLOCKS = (EvaBlock, EvaBlockPostNorm)
_ATTENTIONS = tuple(cls for cls in (EvaAttention, _AttentionRope) if cls is not None)

# The upstream signatures this override reproduces. If timm adds a parameter,
# patching refuses instead of silently ignoring it.
_FEATURES_PARAMS = ("self", "x", "attn_mask", "is_causal")
_INTERMEDIATES_PARAMS = (
    "self",
    "x",
    "indices",
    "return_prefix_tokens",
    "norm",
    "stop_early",
    "output_fmt",
    "intermediates_only",
    "attn_mask",
    "is_causal",
)
# The block forwards that tome_block_forward splits between attention and MLP.
_BLOCK_PARAMS = ("self", "x", "rope", "attn_mask", "is_causal")


@dataclass(frozen=True)
class EvaMergeOptions:
    """The method's settings plus where merged tokens are placed for RoPE.

    rope: ``"grid"`` or ``"tokens"`` for CubistMerge (see the module docstring);
        ToMe always places every merged token at its own position (``"tokens"``).
    """

    method: CubistOptions | ToMeOptions
    rope: str = DEFAULT_ROPE_MODE

    @property
    def recover_output(self) -> bool:
        return self.method.recover_output


def _rope_unsupported(rope: nn.Module | None) -> str | None:
    if rope is None:
        return None
    if _RopeDinoV3 is not None and type(rope) is _RopeDinoV3:
        if rope.normalize_coords not in ("separate", "min", "max"):
            return f"its DINOv3 RoPE normalises coordinates by {rope.normalize_coords!r}, unknown to cubistmerge"
        return None
    if _RopeCat is not None and type(rope) is _RopeCat:
        if rope.grid_type != "index":
            return f"its RotaryEmbeddingCat uses grid_type={rope.grid_type!r}; only 'index' (what Eva builds) is known"
        return None
    return (
        f"its RoPE is {type(rope).__name__}; cubistmerge can place merged tokens only with "
        "RotaryEmbeddingDinoV3 or RotaryEmbeddingCat (mixed and multimodal RoPE are not supported)"
    )


def why_unsupported(model: nn.Module) -> str | None:
    """None if the Eva patch can handle ``model``, else the reason."""
    if not isinstance(model, Eva):
        return f"{type(model).__name__} is not a timm Eva"
    others = sorted({type(blk).__name__ for blk in model.blocks if type(blk) not in _BLOCKS})
    if others:
        return f"its blocks are {others}, not timm.models.eva.EvaBlock or EvaBlockPostNorm"
    if getattr(model, "rope_mixed", False):
        return "it uses mixed RoPE (learned per-block frequencies, RotaryEmbeddingMixed), which is not supported"
    reason = _rope_unsupported(model.rope)
    if reason is not None:
        return reason
    checks = [(Eva, name, _FEATURES_PARAMS) for name in ("forward", "forward_features")]
    checks.append((Eva, "forward_intermediates", _INTERMEDIATES_PARAMS))
    checks += [(cls, "forward", _BLOCK_PARAMS) for cls in _BLOCKS]
    for cls, method, expected in checks:
        found = tuple(inspect.signature(getattr(cls, method)).parameters)
        unknown = set(found) - set(expected)
        if unknown:
            return (
                f"this timm version's {cls.__name__}.{method} has parameters {sorted(unknown)} "
                "that cubistmerge does not know"
            )
    return None


def num_blocks(model: Eva) -> int:
    return len(model.blocks)


def patch(model: Eva, options: CubistOptions | ToMeOptions, rope: str = DEFAULT_ROPE_MODE) -> Eva:
    if isinstance(options, ToMeOptions):
        plain = [type(blk.attn).__name__ for blk in model.blocks if not isinstance(blk.attn, _ATTENTIONS)]
        if plain:
            raise ValueError(f"ToMe needs EvaAttention or AttentionRope modules to read keys from; found {plain[0]}")
        return swap_class(model, _MergingEva, EvaMergeOptions(options, "tokens"), FAMILY)
    if rope not in ROPE_MODES:
        raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
    options.check_grid(tuple(model.patch_embed.grid_size))
    return swap_class(model, _MergingEva, EvaMergeOptions(options, rope), FAMILY)


def unpatch(model: Eva) -> Eva:
    return restore_class(model)


# --------------------------------------------------------------------------- RoPE for merged tokens


def patch_coordinates(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(H*W, 2) float (row, column) index of every patch of an H x W grid, row-major."""
    H, W = grid
    rows = torch.arange(H, device=device, dtype=torch.float32)
    cols = torch.arange(W, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(H * W, 2)


def regular_grid_coordinates(
    grid: tuple[int, int], reduced: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """(H'*W', 2) centres of a regular H' x W' grid over the extent of the H x W grid, in its patch indices.

    Reduced cell i covers input rows [i * H / H', (i + 1) * H / H'), so its
    centre is at row (i + 0.5) * H / H' - 0.5 (likewise for columns).
    """
    (H, W), (Hm, Wm) = grid, reduced
    rows = (torch.arange(Hm, device=device, dtype=torch.float32) + 0.5) * (H / Hm) - 0.5
    cols = (torch.arange(Wm, device=device, dtype=torch.float32) + 0.5) * (W / Wm) - 0.5
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(Hm * Wm, 2)


def member_mean_coordinates(groups: torch.Tensor, num_prefix: int, grid: tuple[int, int], num_out: int) -> torch.Tensor:
    """(B, N', 2) mean (row, column) of the original patches behind every current patch token.

    Args:
        groups: (B, N_orig) current slot of every original token (prefix tokens first, mapping to themselves).
        num_prefix: prefix tokens at the start of both sequences.
        grid: (H, W) of the original patch grid.
        num_out: N', the number of current patch tokens (every one has a member).
    """
    B = groups.shape[0]
    slots = groups[:, num_prefix:] - num_prefix  # (B, H*W) slot among the current patch tokens
    coords = patch_coordinates(grid, groups.device).expand(B, -1, 2)
    sums = coords.new_zeros(B, num_out, 2).scatter_add_(1, slots.unsqueeze(-1).expand(B, slots.shape[1], 2), coords)
    counts = coords.new_zeros(B, num_out).scatter_add_(1, slots, torch.ones_like(coords[..., 0]))
    return sums / counts.unsqueeze(-1)


def rope_coordinates(rope: nn.Module, coords: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch-index (row, column) positions -> the RoPE module's own coordinates of the H x W grid.

    DINOv3: cell centres normalised to [-1, 1] (per axis, or by the shorter or
    longer side), after ``grid_offset``. ``cat`` RoPE with an index grid: the
    index plus ``grid_offset``, rescaled to ``ref_feat_shape`` when set (EVA-02,
    PE). With ``grid_indexing="xy"`` the two coordinate channels are swapped.
    Affine in ``coords``, so fractional positions land between the grid points.
    """
    H, W = grid
    sizes = coords.new_tensor([float(H), float(W)])
    if _RopeDinoV3 is not None and isinstance(rope, _RopeDinoV3):
        if rope.normalize_coords == "separate":
            denominator = sizes
        elif rope.normalize_coords == "min":
            denominator = sizes.min().expand(2)
        else:
            denominator = sizes.max().expand(2)
        frame = 2.0 * ((coords + 0.5 + rope.grid_offset) / denominator) - 1.0
    else:
        frame = coords + rope.grid_offset
        if rope.ref_feat_shape is not None:
            frame = frame / sizes * coords.new_tensor([float(s) for s in rope.ref_feat_shape])
    return frame.flip(-1) if rope.grid_indexing == "xy" else frame


def rope_embedding(rope: nn.Module, frame: torch.Tensor) -> torch.Tensor:
    """The concatenated [sin, cos] RoPE (..., 2 * head_dim) at coordinates ``frame`` (..., 2) of the module.

    The same formula as the module's own embedding: angles 2*pi*c / period
    (DINOv3) or c * band (``cat``) per axis and frequency, axis-major, in the
    module's half or interleaved layout.
    """
    if _RopeDinoV3 is not None and isinstance(rope, _RopeDinoV3):
        periods = rope.periods
        angles = 2 * math.pi * frame.to(periods)[..., None] / periods
    else:
        angles = frame.to(rope.bands)[..., None] * rope.bands
    angles = angles.flatten(-2)  # (..., 2 * num_frequencies)

    def layout(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t], dim=-1) if rope.rotate_half else t.repeat_interleave(2, dim=-1)

    return torch.cat([layout(angles.sin()), layout(angles.cos())], dim=-1)


def _check_rope_augmentation(rope: nn.Module) -> None:
    if rope.training and getattr(rope, "aug_active", False):
        raise RuntimeError(
            "this model's RoPE draws random coordinate augmentations (shift/jitter/rescale) in training; "
            "merged tokens cannot be given positions under the same random draw. Train without "
            "rope_shift_coords/rope_jitter_coords/rope_rescale_coords, or merge in eval mode."
        )


def merged_rope(
    model: Eva,
    state: MergeState,
    grid: tuple[int, int],
    per_token: bool,
    num_tokens: int,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """The RoPE embedding of the current (merged) patch tokens, None for a model without RoPE.

    Args:
        model: the Eva model (its ``rope`` module gives the frequencies).
        state: the merge state after the merge.
        grid: (H, W) of the original patch grid.
        per_token: True: each token at the mean position of its original
            patches, shape (B, 1, N', dim); False: the regular grid
            ``state.grid`` over the original extent, shape (N', dim).
        num_tokens: current number of tokens, prefix included.
        like: the model's own embedding for the original grid (gives dtype).
    """
    rope = model.rope
    if rope is None:
        return None
    _check_rope_augmentation(rope)
    with torch.profiler.record_function("cubistmerge::rope"):
        if per_token:
            coords = member_mean_coordinates(state.groups, state.num_prefix, grid, num_tokens - state.num_prefix)
        else:
            coords = regular_grid_coordinates(grid, state.grid, like.device)
        embedding = rope_embedding(rope, rope_coordinates(rope, coords, grid)).to(like.dtype)
    return embedding.unsqueeze(1) if per_token else embedding


# --------------------------------------------------------------------------- forward


def _block_kwargs(rope: torch.Tensor | None, bias: torch.Tensor | None, is_causal: bool) -> dict[str, Any]:
    # Only pass what is set: older timm blocks take no is_causal argument.
    kwargs: dict[str, Any] = {"rope": rope}
    if bias is not None:
        kwargs["attn_mask"] = bias
    if is_causal:
        kwargs["is_causal"] = True
    return kwargs


def _plain_block_forward(
    block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, state: MergeState, is_causal: bool
) -> torch.Tensor:
    return block(x, **_block_kwargs(rope, state.attn_bias, is_causal))


def tome_block_forward(
    block: EvaBlock | EvaBlockPostNorm,
    x: torch.Tensor,
    rope: torch.Tensor | None,
    state: MergeState,
    index: int,
    options: ToMeOptions,
    is_causal: bool,
) -> tuple[torch.Tensor, MergeState, bool]:
    """One Eva block with ToMe: attention (with proportional attention), merge, MLP; ``index``: the block's place.

    The block's own attention module runs (q/k norm, RoPE, fused attention);
    its residual branches are the block's own (pre-norm with LayerScale
    ``gamma_1``/``gamma_2``, or post-norm). Returns whether tokens were merged.
    """
    bias = state.attention_bias(options.prop_attn, x.dtype)
    if is_causal and bias is not None:
        raise ValueError("is_causal cannot be combined with ToMe's merged tokens; use method='cubist' or no mask")
    post_norm = isinstance(block, EvaBlockPostNorm)
    with captured_keys(block.attn) as keys:  # after k_norm, before RoPE
        if post_norm:
            x = x + block.drop_path1(block.norm1(block.attn(x, **_block_kwargs(rope, bias, is_causal))))
        else:
            attn_out = block.attn(block.norm1(x), **_block_kwargs(rope, bias, is_causal))
            if block.gamma_1 is not None:
                attn_out = block.gamma_1 * attn_out
            x = x + block.drop_path1(attn_out)

    # The metric is the keys averaged over heads, before RoPE, so position does not decide the match.
    x, merged_state = merge_after_attention(x, keys[-1], state, index, options)
    changed = merged_state is not state
    state = merged_state

    if post_norm:
        x = x + block.drop_path2(block.norm2(block.mlp(x)))
    else:
        mlp_out = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            mlp_out = block.gamma_2 * mlp_out
        x = x + block.drop_path2(mlp_out)
    return x, state, changed


class _MergingEva:
    """Mixin placed in front of the model's own class by :func:`patch`."""

    def _merging_tokens(
        self,
        images: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        take_indices: set[int] | None = None,
        last_block: int | None = None,
        norm_intermediates: bool = False,
    ) -> tuple[torch.Tensor, MergeState, list[torch.Tensor]]:
        """Embed and run the blocks with merging.

        Returns the final tokens (not normed, still merged), the final state,
        and the outputs of the blocks in ``take_indices`` in the original
        token layout (optionally normed).
        """
        settings: EvaMergeOptions = options_of(self)
        options = settings.method
        cubist = isinstance(options, CubistOptions)
        per_token = settings.rope == "tokens"
        grid = patch_grid(self, images)
        x, rope = self._pos_embed(self.patch_embed(images))
        x = self.norm_pre(x)
        # ToMe needs every patch's position to place merged tokens, unless the model has no RoPE.
        if cubist:
            needs_grid = "CubistMerge"
        elif self.rope is not None and any(options.r_schedule):
            needs_grid = "ToMe on a RoPE model (to place merged tokens)"
        else:
            needs_grid = None
        state = start_state(self, grid, x, attn_mask, needs_grid=needs_grid)
        original_rope = rope
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        intermediates = []
        blocks = self.blocks if last_block is None else self.blocks[: last_block + 1]
        for i, block in enumerate(blocks):
            if cubist:
                x, state, reduced = cubist_reduce_at(x, state, i, options)
                if reduced:
                    rope = merged_rope(self, state, grid, per_token, x.shape[1], original_rope)
                if checkpointing:
                    x = checkpoint(_plain_block_forward, block, x, rope, state, is_causal, use_reentrant=False)
                else:
                    x = _plain_block_forward(block, x, rope, state, is_causal)
            else:
                if checkpointing:
                    x, state, changed = checkpoint(
                        tome_block_forward, block, x, rope, state, i, options, is_causal, use_reentrant=False
                    )
                else:
                    x, state, changed = tome_block_forward(block, x, rope, state, i, options, is_causal)
                if changed:  # ToMe's tokens are no grid: always placed one by one
                    rope = merged_rope(self, state, grid, True, x.shape[1], original_rope)
            if take_indices is not None and i in take_indices:
                intermediates.append(state.recover(self.norm(x) if norm_intermediates else x))
        if options.trace_source:
            store_source(self, state, x)
        return x, state, intermediates

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        # The head pools the merged tokens, as the merging methods' own code does (see timm_vit).
        x, _, _ = self._merging_tokens(x, attn_mask, is_causal)
        return self.forward_head(self.norm(x))

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x, state, _ = self._merging_tokens(x, attn_mask, is_causal)
        x = self.norm(x)
        return state.recover(x) if options_of(self).recover_output else x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        tokens, state, intermediates = self._merging_tokens(
            x, attn_mask, is_causal, set(take_indices), max_index if stop_early else None, norm
        )
        intermediates, _ = format_intermediates(self, intermediates, x.shape, output_fmt, return_prefix_tokens)
        if intermediates_only:
            return intermediates
        out = self.norm(tokens)
        return (state.recover(out) if options_of(self).recover_output else out), intermediates
