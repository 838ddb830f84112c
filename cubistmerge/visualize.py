"""Which original patches ended up in which merged token: a picture of the merge groups.

A model patched with ``trace_source=True`` keeps, after every forward, the map
from each original token to the final merged token it belongs to. This module
turns that map into an image: every patch is painted with the colour of its
group and the borders between groups are drawn as thin lines.

The point of the picture is the difference between the two methods.
CubistMerge's merged tokens are again a grid: token (i, j) has neighbours
(i, j +- 1) and (i +- 1, j), and its group is a small blob of neighbouring
patches. Colouring every group by the parity of its row and column in that
merged grid draws a warped checkerboard, whose rows and columns can be followed
across the image. ToMe's merged tokens are an unordered set (groups of any
size, joined by similarity); they get one distinct colour each, which gives an
irregular patchwork with large groups in plain areas.

Three levels:

* :func:`merge_groups_of` runs a patched model on one image and returns the
  group of every patch;
* :func:`group_colour_image` draws such groups over an image (numpy only);
* :func:`visualize_methods` does everything for a list of methods and writes
  one PNG (needs matplotlib, which is part of the ``eval`` extra).
"""

from __future__ import annotations

import colorsys
import contextlib
import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from .patch import UnsupportedModelError
from .patch import patch as patch_model
from .patch._swap import SOURCE_ATTR, patched_family
from .patch._tokens import patch_grid

# Only these families keep one token sequence for the whole image, so their
# source map covers every patch; the windowed families (SAM encoders, TinyViT)
# keep no source map.
_SEQUENCE_FAMILIES = (VisionTransformer, Eva)

# The merging methods that can record which patches form each token (trace_source); others, such
# as Expedite (tokens rebuilt as weighted sums, no groups), have nothing to draw.
TRACED_METHODS = ("cubist", "tome")

# How group_colour_image colours groups; visualize_methods also takes "auto".
COLOUR_MODES = ("grid", "random", "mean")
METHOD_NAMES = {"cubist": "CubistMerge", "tome": "ToMe"}

# "grid" colours, indexed [merged row % 2][merged column % 2]: rows alternate between red and
# blue, columns between dark and light, so every token differs from its four grid neighbours and
# the merged rows show as red and blue bands across the image.
_GRID_COLOURS = np.array(
    [
        [[200, 30, 40], [255, 150, 150]],  # even rows: red, pink
        [[20, 60, 190], [130, 190, 255]],  # odd rows: blue, light blue
    ],
    dtype=np.float64,
)

# Hue step between consecutive group ids in "random": the golden ratio spreads any run of
# consecutive ids around the colour wheel, and ids follow token order, which is roughly image
# order, so neighbouring groups rarely get similar hues.
_GOLDEN = 0.618033988749895

# The panels are drawn at least this many pixels wide: at the model's input
# size (often 224) a one-pixel border would be a large share of a 16-pixel patch.
_MIN_PANEL_PIXELS = 448


class MethodGroups(NamedTuple):
    """The merge groups one method formed on the image."""

    label: str  # the panel's label, e.g. "CubistMerge r=(4,4) @1"
    method: str  # "cubist" or "tome"
    options: dict[str, Any]  # the options given for the method (trace_source is always added)
    groups: torch.Tensor  # (H*W,) long: the final token of every patch, row-major over the patch grid
    grid: tuple[int, int]  # (H, W) of the patch grid
    merged_grid: tuple[int, int] | None  # (H', W') the merged tokens form, None if they form no grid (ToMe)

    @property
    def num_tokens(self) -> int:
        """Number of merged patch tokens (prefix tokens such as CLS not counted)."""
        return int(self.groups.unique().numel())


# --------------------------------------------------------------------------- groups from a model


def sequence_backbone(model: nn.Module) -> nn.Module:
    """The timm ViT / Eva in ``model``: the model itself or its ``.backbone`` (wrappers with real weights)."""
    if isinstance(model, _SEQUENCE_FAMILIES):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, _SEQUENCE_FAMILIES):
        return backbone
    raise UnsupportedModelError(
        f"the merge visualization needs a timm VisionTransformer or Eva, or a module whose .backbone is one; "
        f"got {type(model).__module__}.{type(model).__name__}. SAM image encoders and TinyViT merge inside "
        f"windows and keep no source map."
    )


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no patch dropout, which would remove patches) for one forward, then the caller's modes again."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def merge_groups_of(model: nn.Module, image_tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Run a patched model on one image and return the merge group of every patch.

    Args:
        model: a timm VisionTransformer or Eva (or a module whose ``.backbone``
            is one) patched by :func:`cubistmerge.patch` with ``trace_source=True``.
            Its train/eval modes are restored afterwards; the forward leaves its
            source map on it, as every traced forward does.
        image_tensor: (3, H_img, W_img) or (1, 3, H_img, W_img), already
            transformed for the model (resized, normalized).

    Returns:
        groups: (H*W,) long on the CPU, row-major over the patch grid: the
            index, among the final merged patch tokens, of the token each patch
            belongs to (prefix tokens such as CLS are left out; ids run from 0
            to the number of merged patch tokens - 1, in token order).
        grid: (H, W) of the patch grid.
    """
    vit = sequence_backbone(model)
    if patched_family(vit) is None:
        raise ValueError("the model is not patched: call cubistmerge.patch(model, method, trace_source=True) first")
    if image_tensor.dim() == 3:
        image_tensor = image_tensor.unsqueeze(0)
    if image_tensor.dim() != 4 or image_tensor.shape[:2] != (1, 3):
        raise ValueError(f"image_tensor must be (3, H, W) or (1, 3, H, W), got shape {tuple(image_tensor.shape)}")
    device = next(vit.parameters()).device
    images = image_tensor.to(device)
    # Compared by identity after the forward: a model patched without trace_source leaves the old map (or none).
    previous = vit.__dict__.get(SOURCE_ATTR)
    with torch.no_grad(), _evaluating(vit):
        vit.forward_features(images)
    source = vit.__dict__.get(SOURCE_ATTR)
    if source is None or source is previous:
        raise ValueError("the model was patched without trace_source=True, so it records no merge groups")

    grid = tuple(int(side) for side in patch_grid(vit, images))
    prefix = vit.num_prefix_tokens
    if source.shape != (1, prefix + grid[0] * grid[1]):
        raise RuntimeError(
            f"the source map has shape {tuple(source.shape)}, expected (1, {prefix} prefix + {grid[0]}x{grid[1]} "
            f"patches)"
        )
    # Prefix tokens are never merged and keep the first slots, so patch groups start at slot `prefix`.
    groups = source[0, prefix:].cpu() - prefix
    return groups, grid


def _as_groups_array(source: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``source`` as a new (H, W) int64 array, checked to hold one non-negative group id per patch."""
    groups = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    H, W = grid
    if groups.shape != (H * W,) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(
            f"source must be H*W = {H * W} integer group ids for the {H}x{W} grid, "
            f"got shape {groups.shape} dtype {groups.dtype}"
        )
    if groups.min(initial=0) < 0:
        raise ValueError("source group ids must be >= 0")
    return groups.astype(np.int64).reshape(H, W)


def merged_grid_of(source: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The (H', W') grid the merged tokens form, or None when the groups are not laid out as one.

    A CubistMerge reduction (any number of passes) keeps the patch grid's
    border: the first row of patches lands in merged row 0 and reaches every
    merged column, the first column lands in merged column 0 and reaches every
    merged row, and likewise for the last row and column. With ids numbered
    row-major over the merged grid that fixes W' (the ids of the first row) and
    H' (ids / W'); this checks all four borders against them.
    """
    groups = _as_groups_array(source, grid)
    ids = np.unique(groups)
    num = len(ids)
    width = len(np.unique(groups[0]))
    if not np.array_equal(ids, np.arange(num)) or num % width:
        return None
    height = num // width
    borders = (
        (groups[0], np.arange(width)),
        (groups[-1], (height - 1) * width + np.arange(width)),
        (groups[:, 0], np.arange(height) * width),
        (groups[:, -1], np.arange(height) * width + width - 1),
    )
    if all(np.array_equal(np.unique(found), expected) for found, expected in borders):
        return height, width
    return None


# --------------------------------------------------------------------------- shape of the groups


def _piece_labels(groups: np.ndarray) -> np.ndarray:
    """(H, W) label of the connected piece every patch is in (patches joined through edges within a group)."""
    H, W = groups.shape
    # Every patch starts as its own piece; patches take the smallest label among same-group edge
    # neighbours until nothing changes, so each connected piece ends with one label.
    labels = np.arange(H * W).reshape(H, W)
    same_right = groups[:, 1:] == groups[:, :-1]
    same_below = groups[1:, :] == groups[:-1, :]
    while True:
        new = labels.copy()
        new[:, :-1] = np.where(same_right, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        new[:, 1:] = np.where(same_right, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:-1, :] = np.where(same_below, np.minimum(new[:-1, :], labels[1:, :]), new[:-1, :])
        new[1:, :] = np.where(same_below, np.minimum(new[1:, :], labels[:-1, :]), new[1:, :])
        if np.array_equal(new, labels):
            return labels
        labels = new


class GroupStats(NamedTuple):
    """Shape statistics of merge groups over the patch grid."""

    num_groups: int
    smallest: int  # patches in the smallest group
    largest: int  # patches in the largest group
    widest: int  # largest bounding-box side of a group, in patches
    split: int  # groups made of several pieces that do not touch along patch edges


def group_stats(source: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> GroupStats:
    """How large, how spread out and how often split the groups are."""
    groups = _as_groups_array(source, grid)
    _, dense = np.unique(groups, return_inverse=True)
    dense = dense.reshape(grid)
    num = int(dense.max()) + 1
    sizes = np.bincount(dense.reshape(-1))
    spans = []
    for positions in np.indices(grid):
        high = np.full(num, -1)
        low = np.full(num, max(grid))
        np.maximum.at(high, dense.reshape(-1), positions.reshape(-1))
        np.minimum.at(low, dense.reshape(-1), positions.reshape(-1))
        spans.append(high - low + 1)
    pieces = np.unique(np.stack([dense.reshape(-1), _piece_labels(dense).reshape(-1)]), axis=1)[0]
    split = int((np.bincount(pieces, minlength=num) > 1).sum())
    return GroupStats(num, int(sizes.min()), int(sizes.max()), int(np.maximum(*spans).max()), split)


# --------------------------------------------------------------------------- drawing (numpy only)


def group_palette(num_groups: int) -> np.ndarray:
    """(num_groups, 3) uint8 colours, consecutive ids far apart in hue and alternating in shade."""
    colours = []
    for k in range(num_groups):
        hue = (k * _GOLDEN) % 1.0
        # Two saturation and two value levels on different periods: groups whose hues land close
        # (ids 13 or 21 apart, Fibonacci numbers) still differ in shade.
        saturation = 0.9 if k % 2 == 0 else 0.6
        value = 1.0 if (k // 2) % 2 == 0 else 0.75
        colours.append(colorsys.hsv_to_rgb(hue, saturation, value))
    return np.round(np.asarray(colours, dtype=np.float64).reshape(num_groups, 3) * 255).astype(np.uint8)


def _pixel_groups(groups: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H_img, W_img) group of every pixel, for (H, W) patch groups: the image is split evenly into the patches."""
    H, W = groups.shape
    height, width = size
    rows = np.arange(height) * H // height
    cols = np.arange(width) * W // width
    return groups[rows[:, None], cols[None, :]]


def _boundary_mask(pixel_groups: np.ndarray, width: int) -> np.ndarray:
    """True on pixels within ``width`` pixels of a border between two different groups."""
    edge = np.zeros(pixel_groups.shape, dtype=bool)
    right = pixel_groups[:, 1:] != pixel_groups[:, :-1]  # border between pixel columns x and x + 1
    below = pixel_groups[1:, :] != pixel_groups[:-1, :]
    # The line is split over both sides of the border, so it sits centred on it.
    before, after = (width + 1) // 2, width // 2
    for shift in range(before):
        edge[:, : edge.shape[1] - 1 - shift] |= right[:, shift:]
        edge[: edge.shape[0] - 1 - shift, :] |= below[shift:, :]
    for shift in range(after):
        edge[:, 1 + shift :] |= right[:, : right.shape[1] - shift]
        edge[1 + shift :, :] |= below[: below.shape[0] - shift, :]
    return edge


def _piece_links(dense: np.ndarray, size: tuple[int, int]) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Pixel segments from the centre of every smaller piece of a split group to the centre of its largest piece."""
    H, W = dense.shape
    labels = _piece_labels(dense)
    rows, cols = np.indices((H, W))
    # Patch centres in pixels of an image split evenly into H x W patches.
    centre_y = (rows + 0.5) * size[0] / H
    centre_x = (cols + 0.5) * size[1] / W
    links = []
    for group in np.unique(dense):
        pieces = np.unique(labels[dense == group])
        if len(pieces) < 2:
            continue
        centres = []
        for piece in pieces:
            members = labels == piece
            centres.append((int(members.sum()), float(centre_y[members].mean()), float(centre_x[members].mean())))
        centres.sort(key=lambda item: -item[0])
        _, main_y, main_x = centres[0]
        links.extend(((main_y, main_x), (y, x)) for _, y, x in centres[1:])
    return links


def _segment_mask(
    shape: tuple[int, int], start: tuple[float, float], end: tuple[float, float], width: int
) -> np.ndarray:
    """True on the pixels of a straight segment ``width`` pixels thick (square brush, sampled every half pixel)."""
    mask = np.zeros(shape, dtype=bool)
    steps = int(np.ceil(2 * np.hypot(end[0] - start[0], end[1] - start[1]))) + 1
    ys = np.round(np.linspace(start[0], end[0], steps)).astype(np.int64)
    xs = np.round(np.linspace(start[1], end[1], steps)).astype(np.int64)
    low = (width - 1) // 2
    for dy in range(-low, width - low):
        for dx in range(-low, width - low):
            mask[np.clip(ys + dy, 0, shape[0] - 1), np.clip(xs + dx, 0, shape[1] - 1)] = True
    return mask


def _token_centres(dense: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, 2) pixel (y, x) centre of every group: the mean of its patches' centres."""
    H, W = dense.shape
    rows, cols = np.indices((H, W))
    flat = dense.reshape(-1)
    counts = np.bincount(flat).astype(np.float64)
    centre_y = np.bincount(flat, ((rows + 0.5) * size[0] / H).reshape(-1)) / counts
    centre_x = np.bincount(flat, ((cols + 0.5) * size[1] / W).reshape(-1)) / counts
    return np.stack([centre_y, centre_x], axis=1)


def _grid_segments(centres: np.ndarray, merged_grid: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segments between the centres of tokens that are neighbours in the merged grid (row-major ids)."""
    Hm, Wm = merged_grid
    at = centres.reshape(Hm, Wm, 2)
    segments = [(at[i, j], at[i, j + 1]) for i in range(Hm) for j in range(Wm - 1)]
    segments += [(at[i, j], at[i + 1, j]) for i in range(Hm - 1) for j in range(Wm)]
    return segments


def _check_rgb(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple | list) or len(value) != 3 or not all(0 <= v <= 255 for v in value):
        raise ValueError(f"{name} must be None or an (r, g, b) triple of values in [0, 255], got {value!r}")


def group_colour_image(
    source: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    image: np.ndarray,
    *,
    colour: str = "random",
    merged_grid: tuple[int, int] | None = None,
    alpha: float = 0.6,
    boundary_colour: tuple[int, int, int] | None = (0, 0, 0),
    boundary_width: int = 1,
    link_colour: tuple[int, int, int] | None = None,
    link_width: int = 3,
    tokens: bool = False,
) -> np.ndarray:
    """Paint every patch with the colour of its merge group over ``image``.

    Args:
        source: (H*W,) integer group of every patch, row-major (from :func:`merge_groups_of`).
        grid: (H, W) of the patch grid; the image is split evenly into H x W patches,
            so it may be larger than the model's input (drawn at a higher resolution).
        image: (H_img, W_img, 3) uint8, the image the model saw; not modified.
        colour: how groups are coloured (blended with the image by ``alpha``):
            ``"grid"``: by the parity of the group's row and column in the
            merged grid (needs ``merged_grid``; ids numbered row-major over it,
            as CubistMerge numbers them): rows alternate red / blue, columns
            dark / light, a checkerboard that follows the merged rows and columns;
            ``"random"``: one distinct colour per group;
            ``"mean"``: every group filled with the mean colour of its pixels
            (ToMe paper style: what the merged tokens "see"; ``alpha`` unused).
        merged_grid: (H', W') of the merged tokens, for ``colour="grid"``
            (see :func:`merged_grid_of`).
        alpha: weight of the group colour against the image, in [0, 1].
        boundary_colour: RGB of the lines drawn between neighbouring patches of
            different groups, or None for no lines.
        boundary_width: line width in pixels (>= 1).
        link_colour: RGB of lines joining the pieces of groups that are split
            into pieces not touching along patch edges (from the centre of the
            largest piece to the centre of every other piece, outlined in
            black), or None (default) for no such lines.
        link_width: width of those lines in pixels (>= 1).
        tokens: also mark every merged token at the centre of its group (a
            white dot) and, with ``merged_grid``, join the tokens that are
            neighbours in the merged grid by white lines: the merged rows and
            columns drawn as a (warped) mesh over the image.

    Returns:
        (H_img, W_img, 3) uint8, a new array.
    """
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour must be one of {COLOUR_MODES}, got {colour!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for name, width in (("boundary_width", boundary_width), ("link_width", link_width)):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{name} must be an int >= 1, got {width!r}")
    _check_rgb("boundary_colour", boundary_colour)
    _check_rgb("link_colour", link_colour)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    H, W = grid
    if image.shape[0] < H or image.shape[1] < W:
        raise ValueError(f"the image ({image.shape[0]}x{image.shape[1]}) is smaller than the {H}x{W} patch grid")
    groups = _as_groups_array(source, grid)
    # Dense ids 0..K-1 index the palettes and per-group sums directly, whatever ids the caller used.
    _, dense = np.unique(groups, return_inverse=True)
    dense = dense.reshape(grid)
    per_pixel = _pixel_groups(dense, image.shape[:2])
    num_groups = int(dense.max()) + 1
    pixels = image.astype(np.float64)

    if colour == "mean":
        flat = per_pixel.reshape(-1)
        counts = np.bincount(flat, minlength=num_groups).astype(np.float64)
        sums = np.stack([np.bincount(flat, pixels[..., c].reshape(-1), minlength=num_groups) for c in range(3)], 1)
        out = (sums / counts[:, None])[per_pixel]
    else:
        if colour == "grid":
            if merged_grid is None or int(np.prod(merged_grid)) != num_groups or groups.max() >= num_groups:
                raise ValueError(
                    f"colour='grid' needs merged_grid=(H', W') with H' * W' = {num_groups} groups numbered "
                    f"0..{num_groups - 1} row-major; got merged_grid={merged_grid!r} (use merged_grid_of, or "
                    f"colour='random' for merges that form no grid)"
                )
            # Ids are already dense here (0..K-1), so the dense id is the row-major slot of the merged grid.
            palette = _GRID_COLOURS[(np.arange(num_groups) // merged_grid[1]) % 2, np.arange(num_groups) % 2]
        else:
            palette = group_palette(num_groups).astype(np.float64)
        out = (1.0 - alpha) * pixels + alpha * palette[per_pixel]

    if boundary_colour is not None:
        out[_boundary_mask(per_pixel, boundary_width)] = np.asarray(boundary_colour, dtype=np.float64)
    if link_colour is not None:
        shape = image.shape[:2]
        links = _piece_links(dense, shape)
        # All black outlines first, then all coloured cores: a later outline never cuts an earlier line.
        for width, rgb in ((link_width + 2, (0, 0, 0)), (link_width, link_colour)):
            for start, end in links:
                out[_segment_mask(shape, start, end, width)] = np.asarray(rgb, dtype=np.float64)
    if tokens:
        shape = image.shape[:2]
        centres = _token_centres(dense, shape)
        segments = [] if merged_grid is None else _grid_segments(centres, merged_grid)
        dots = [(centre, centre) for centre in centres]
        # Black under white, as for the links: visible on light and dark image areas alike.
        for items, widths in ((segments, (4, 2)), (dots, (7, 5))):
            for width, rgb in zip(widths, ((0, 0, 0), (255, 255, 255)), strict=True):
                for start, end in items:
                    out[_segment_mask(shape, start, end, width)] = np.asarray(rgb, dtype=np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- one PNG for several methods


def token_layout_image(
    source: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    image: np.ndarray,
    merged_grid: tuple[int, int] | None = None,
    fill: tuple[int, int, int] = (128, 128, 128),
) -> np.ndarray:
    """The merged tokens as the later blocks hold them, each drawn in its group's mean image colour.

    With a ``merged_grid`` (H', W') (CubistMerge) token ``i`` is cell ``divmod(i, W')``: a (H', W', 3)
    picture, a smaller version of the image. Without one (ToMe) the tokens are a sequence with no 2D
    place; they are written row by row in sequence order into a near-square block (cells past the last
    token get ``fill``), which shows what a spatial layer would be handed.

    Args:
        source: (H * W,) group id of every patch (row-major), ids 0..K-1 in token order.
        grid: (H, W) patch grid.
        image: (H_img, W_img, 3) uint8 picture the patches tile evenly.
    Returns:
        (rows, cols, 3) uint8 array, one pixel per token.
    """
    groups = _as_groups_array(source, grid)
    picture = np.asarray(image)
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {picture.shape}")
    num = int(groups.max()) + 1
    pixel_groups = _pixel_groups(groups, picture.shape[:2]).ravel()
    counts = np.bincount(pixel_groups, minlength=num).astype(np.float64)
    means = (
        np.stack(
            [
                np.bincount(pixel_groups, weights=picture[..., c].ravel().astype(np.float64), minlength=num)
                for c in range(3)
            ],
            axis=1,
        )
        / np.maximum(counts, 1)[:, None]
    )
    if merged_grid is not None:
        rows, cols = merged_grid
        if rows * cols != num:
            raise ValueError(f"merged_grid {merged_grid} holds {rows * cols} tokens, the groups are {num}")
    else:
        cols = int(np.ceil(np.sqrt(num)))
        rows = -(-num // cols)
    out = np.empty((rows * cols, 3), dtype=np.float64)
    out[:] = fill
    out[:num] = means
    return out.reshape(rows, cols, 3).round().clip(0, 255).astype(np.uint8)


def describe(method: str, options: Mapping[str, Any]) -> str:
    """A short label for a method and its settings, e.g. ``"CubistMerge r=(4,4) @1"`` or ``"ToMe r=8"``."""
    rest = {key: value for key, value in options.items() if key not in ("trace_source", "recover_output")}
    parts = [METHOD_NAMES.get(method, method)]
    if method == "cubist" and "stages" not in rest:
        # patch()'s defaults, so a label never hides the settings that ran.
        parts.append(f"r={_compact(rest.pop('r', 1))} @{rest.pop('loc', 1)}")
    elif method == "tome":
        parts.append(f"r={_compact(rest.pop('r', 8))}")
    parts.extend(f"{key}={_compact(value)}" for key, value in rest.items())
    return " ".join(parts)


def _compact(value: Any) -> str:
    """repr without spaces or quotes, so (4, 4) reads (4,4) in a title."""
    return repr(value).replace(" ", "").replace("'", "")


def _load_image(image: str | os.PathLike | np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # convert returns a copy: the caller's image is not touched
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image.copy())
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    raise TypeError(f"image must be a file path, a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")


def _input_size(vit: nn.Module, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of the model input: ``img_size`` if the model can take it, else the size it was built for."""
    built = tuple(int(side) for side in vit.patch_embed.img_size)
    if img_size is None:
        return built
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(side) for side in img_size)
    if size != built and not getattr(vit, "dynamic_img_size", False):
        raise ValueError(
            f"this model was built for {built[0]}x{built[1]} images and has no dynamic_img_size: "
            f"img_size must be None or {built}, got {img_size!r} (or pass a model name to build it at that size)"
        )
    return size


def _build_model(model: str | nn.Module, img_size: int | tuple[int, int] | None, pretrained: bool, seed: int):
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
    kwargs: dict[str, Any] = {} if img_size is None else {"img_size": img_size}
    # The caller's global RNG is left as it was; the seed makes random-weight pictures reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(model, pretrained=pretrained, **kwargs).eval()


def _check_methods(methods: Sequence[tuple[str | None, str, Mapping[str, Any]]]) -> None:
    if isinstance(methods, str | bytes) or not isinstance(methods, Sequence) or not methods:
        raise ValueError("methods must be a non-empty list of (label or None, method, options dict)")
    for entry in methods:
        if not isinstance(entry, tuple | list) or len(entry) != 3:
            raise ValueError(f"every method must be (label or None, method, options dict), got {entry!r}")
        label, method, options = entry
        if method not in TRACED_METHODS:
            raise ValueError(
                f"method must be one of {TRACED_METHODS} (the methods that record merge groups), got {method!r}"
            )
        if label is not None and not isinstance(label, str):
            raise ValueError(f"a label must be a string or None, got {label!r}")
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict of cubistmerge.patch options, got {options!r}")


def _model_image(vit: nn.Module, picture: Image.Image, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """The model input (3, H, W) from timm's eval transform, and the same crop as uint8 (H, W, 3) for display."""
    config = timm.data.resolve_model_data_config(vit)
    # pretrained_cfg keeps the size of the original weights even for a model built at another img_size.
    config["input_size"] = (3, *size)
    transform = timm.data.create_transform(**config, is_training=False)
    tensor = transform(picture)
    # Undoing the normalization gives exactly the resized, cropped pixels the model saw.
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    shown = ((tensor * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return tensor, shown


def _panel_title(result: MethodGroups, colour: str) -> str:
    H, W = result.grid
    stats = group_stats(result.groups, result.grid)
    if result.merged_grid is not None:
        layout = "tokens keep a {}x{} grid".format(*result.merged_grid)
    else:
        layout = "tokens form no grid"
    legend = {"grid": "red/blue rows, dark/light columns", "random": "one colour per token"}
    return (
        f"{result.label}: {H * W} -> {stats.num_groups} tokens\n{layout}\n"
        f"{legend.get(colour, 'mean colour per token')}\n"
        f"groups of {stats.smallest}-{stats.largest} patches, up to {stats.widest} across"
    )


def visualize_methods(
    image: str | os.PathLike | np.ndarray | Image.Image,
    model: str | nn.Module,
    methods: Sequence[tuple[str | None, str, Mapping[str, Any]]],
    *,
    img_size: int | tuple[int, int] | None = None,
    output: str | os.PathLike = "cubistmerge_groups.png",
    colour: str = "auto",
    alpha: float = 0.6,
    links: bool = False,
    tokens: bool = False,
    pretrained: bool = False,
    seed: int = 0,
    panel_inches: float = 4.0,
    dpi: int = 120,
) -> tuple[Path, list[MethodGroups]]:
    """Write one PNG: the image, then one panel per method with its merge groups.

    Args:
        image: a file path, a PIL image or an (H, W, 3) uint8 array.
        model: a timm model name (built with random weights unless
            ``pretrained=True``), or a timm VisionTransformer / Eva module (or a
            module whose ``.backbone`` is one), e.g. one with real weights.
            A module is not modified: every method patches a deep copy.
        methods: ``(label, method, options)`` per panel: ``method`` is
            ``"cubist"`` or ``"tome"``, ``options`` the keyword options of
            :func:`cubistmerge.patch` (``trace_source=True`` is added), ``label``
            the panel title, or None for one made from the method and options.
        img_size: model input size (int or (H, W)); None: the model's own.
        output: PNG path to write (parent folders are created).
        colour: ``"auto"`` (default): ``"grid"`` for merges whose tokens keep a
            grid (CubistMerge), ``"random"`` for the others (ToMe); or one of
            ``"random"``, ``"mean"`` for every panel (see :func:`group_colour_image`).
        alpha: weight of the group colours against the image.
        links: also draw white lines joining the pieces of groups split into
            pieces that do not touch along patch edges.
        tokens: also mark every merged token with a dot at its group's centre
            and, for merges that keep a grid, draw the merged rows and columns
            through them (a warped mesh against ToMe's loose dots; clear with
            random weights, a tangle when real features warp the grid strongly).
        pretrained: download timm's weights for a model name.
        seed: random-weight initialization of a model name.
        panel_inches: width of one panel; dpi: resolution of the PNG.

    Returns:
        the PNG path and, per method in order, its :class:`MethodGroups`.
    """
    if colour not in ("auto", "random", "mean"):
        raise ValueError(f"colour must be 'auto', 'random' or 'mean', got {colour!r}")
    _check_methods(methods)
    picture = _load_image(image)
    vit = sequence_backbone(_build_model(model, img_size, pretrained, seed))
    tensor, shown = _model_image(vit, picture, _input_size(vit, img_size))

    results = []
    for label, method, options in methods:
        merging = patch_model(copy.deepcopy(vit), method, **{**options, "trace_source": True})
        groups, grid = merge_groups_of(merging, tensor)
        # Only CubistMerge lays its tokens out as a grid; for ToMe a chance match of the border test means nothing.
        layout = merged_grid_of(groups, grid) if method == "cubist" else None
        results.append(MethodGroups(label or describe(method, options), method, dict(options), groups, grid, layout))

    # Drawn larger than the model input, so one-pixel borders stay thin next to the patches.
    scale = max(1, -(-_MIN_PANEL_PIXELS // min(shown.shape[:2])))
    large = np.asarray(Image.fromarray(shown).resize((shown.shape[1] * scale, shown.shape[0] * scale), Image.BICUBIC))
    panels = [("image", large)]
    for result in results:
        mode = colour if colour != "auto" else ("grid" if result.merged_grid is not None else "random")
        drawn = group_colour_image(
            result.groups,
            result.grid,
            large,
            colour=mode,
            merged_grid=result.merged_grid,
            alpha=alpha,
            link_colour=(255, 255, 255) if links else None,
            tokens=tokens,
        )
        panels.append((_panel_title(result, mode), drawn))
    # What the later blocks hold: a grid of tokens (a small picture) or an unordered sequence.
    grid_size = results[0].grid  # the patch grid, the same for every method
    patches = token_layout_image(np.arange(grid_size[0] * grid_size[1]), grid_size, shown, grid_size)
    layouts = [(f"the {patches.shape[0]}x{patches.shape[1]} patch tokens (mean colours)", patches)]
    for result in results:
        layout = token_layout_image(result.groups, result.grid, shown, result.merged_grid)
        if result.merged_grid is not None:
            what = "tokens in their {}x{} grid: still an image".format(*result.merged_grid)
        else:
            what = f"{layout.shape[0] * layout.shape[1]} cells, tokens in sequence order: no 2D place"
        layouts.append((what, layout))
    return _save_panels([panels, layouts], Path(output), panel_inches, dpi), results


def _save_panels(rows: list[list[tuple[str, np.ndarray]]], output: Path, panel_inches: float, dpi: int) -> Path:
    # Agg renders to files without a display (servers, CI); used directly, not through pyplot,
    # it leaves the caller's pyplot backend and open figures alone.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("writing the PNG needs matplotlib: pip install matplotlib (or cubistmerge[eval])") from None
    height, width = rows[0][0][1].shape[:2]
    columns = max(len(row) for row in rows)
    row_inches = panel_inches * height / width + 0.8
    figure = Figure(figsize=(panel_inches * columns, row_inches * len(rows)), dpi=dpi)
    figure.set_layout_engine("constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axes_row, row in zip(axes, rows, strict=True):
        for ax in axes_row:
            ax.set_axis_off()
        for ax, (title, picture) in zip(axes_row, row, strict=False):
            # every panel spans the same area, so a 12x12 token grid shows as large as the image
            ax.imshow(picture, interpolation="nearest", extent=(0, width, height, 0))
            ax.set_title(title, fontsize=9)
    output.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to the multi-line titles instead of cutting their first lines off.
    figure.savefig(output, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return output


__all__ = [
    "COLOUR_MODES",
    "TRACED_METHODS",
    "GroupStats",
    "MethodGroups",
    "describe",
    "group_colour_image",
    "group_palette",
    "group_stats",
    "merge_groups_of",
    "merged_grid_of",
    "sequence_backbone",
    "token_layout_image",
    "visualize_methods",
]
