"""SAM distillation losses beyond the image embeddings: the padded area left out, and what the mask decoder makes.

SAM's input is the image resized so its longest side fills the input, normalised, then zero-padded at the
bottom and right. Two ways to compare a student with its teacher that follow from how SAM is used:

* :func:`valid_embedding_mse`: the embedding MSE over the cells that cover the image only (the padded cells
  are part of what the decoder attends to, but no prompt ever points there).
* :func:`decoder_loss`: the frozen prompt encoder and mask decoder run on the student's and on the teacher's
  embeddings for prompts taken from the image without labels: a grid of points over the image, and the box
  around each point's mask as the teacher predicts it (SAM's users prompt with points and boxes). The loss is
  the MSE of the low-resolution mask logits (over the image's area) plus the MSE of the IoU predictions.

The padded area is found from the input itself: the rows and columns after the last one holding a non-zero
pixel (SAM normalises before padding, so padding is exactly zero and an image row is zero in all three
channels only by a vanishing chance).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def valid_extent(images: torch.Tensor) -> list[tuple[int, int]]:
    """(height, width) of the image inside each zero-padded (B, 3, H, W) input; at least 1 x 1."""
    extents = []
    for image in images:
        nonzero = image.abs().amax(dim=0) > 0  # (H, W)
        rows = torch.nonzero(nonzero.any(dim=1)).flatten()
        cols = torch.nonzero(nonzero.any(dim=0)).flatten()
        height = int(rows[-1]) + 1 if rows.numel() else 1
        width = int(cols[-1]) + 1 if cols.numel() else 1
        extents.append((height, width))
    return extents


def _cells(extent: int, size: int, grid: int) -> int:
    """How many of ``grid`` cells along a side of ``size`` input pixels the first ``extent`` pixels touch."""
    return max(1, min(grid, -(-extent * grid // size)))


def valid_embedding_mse(student: torch.Tensor, teacher: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """MSE of (B, C, h, w) embeddings over the cells covering each image, averaged over the batch."""
    size_h, size_w = images.shape[-2:]
    losses = []
    for s, t, (height, width) in zip(student, teacher, valid_extent(images), strict=True):
        rows, cols = _cells(height, size_h, s.shape[-2]), _cells(width, size_w, s.shape[-1])
        losses.append(F.mse_loss(s[:, :rows, :cols].float(), t[:, :rows, :cols].float()))
    return torch.stack(losses).mean()


def grid_points(height: int, width: int, side: int) -> torch.Tensor:
    """(side * side, 2) point prompts (x, y) at the centres of a side x side grid over a height x width image."""
    ys = (torch.arange(side, dtype=torch.float32) + 0.5) * height / side
    xs = (torch.arange(side, dtype=torch.float32) + 0.5) * width / side
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


def decode(
    sam: nn.Module, embedding: torch.Tensor, points: torch.Tensor | None = None, boxes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder and mask decoder on one image embedding (1, C, h, w): one mask per prompt.

    ``points`` (K, 2) single positive points or ``boxes`` (K, 4) (x0, y0, x1, y1), in the input frame.
    Returns low-resolution mask logits (K, 1, 4h, 4w) and IoU predictions (K, 1).
    """
    if (points is None) == (boxes is None):
        raise ValueError("give either points or boxes")
    if points is not None:
        labels = torch.ones(points.shape[0], 1, dtype=torch.int, device=points.device)
        sparse, dense = sam.prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
    else:
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    return sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


def mask_boxes(logits: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (K, 4) around the positive logits of (K, 1, h, w) masks, in a frame ``scale`` times larger, and
    which masks had any positive pixel (K,)."""
    positive = logits[:, 0] > 0
    rows, cols = positive.any(dim=2), positive.any(dim=1)  # (K, h), (K, w)
    found = rows.any(dim=1)
    h_index = torch.arange(rows.shape[1], device=logits.device)
    w_index = torch.arange(cols.shape[1], device=logits.device)
    y0 = torch.where(rows, h_index, rows.shape[1]).amin(dim=1)
    y1 = torch.where(rows, h_index, -1).amax(dim=1) + 1
    x0 = torch.where(cols, w_index, cols.shape[1]).amin(dim=1)
    x1 = torch.where(cols, w_index, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float() * scale
    return boxes, found


def decoder_loss(
    sam: nn.Module, student: torch.Tensor, teacher: torch.Tensor, images: torch.Tensor, side: int
) -> torch.Tensor:
    """Mask-logit MSE (over the image's area) plus IoU-prediction MSE of the frozen decoder, student vs teacher.

    ``student``, ``teacher``: (B, C, h, w) embeddings; ``images``: the (B, 3, S, S) inputs they were computed
    from (for the image's extent); ``side``: the point grid's side. Averaged over images and prompts.
    """
    size = images.shape[-1]
    losses = []
    for index, (height, width) in enumerate(valid_extent(images)):
        s, t = student[index : index + 1].float(), teacher[index : index + 1].float()
        points = grid_points(height, width, side).to(t.device)
        with torch.no_grad():
            # the teacher's masks for the points, and for the boxes around them (the second kind of prompt)
            point_targets = decode(sam, t, points=points)
            boxes, found = mask_boxes(point_targets[0], size / point_targets[0].shape[-1])
            prompts = [("points", points, point_targets)]
            if bool(found.any()):
                prompts.append(("boxes", boxes[found], decode(sam, t, boxes=boxes[found])))
        for name, prompt, (t_logits, t_iou) in prompts:
            s_logits, s_iou = decode(sam, s, **{name: prompt})
            rows = _cells(height, size, s_logits.shape[-2])
            cols = _cells(width, size, s_logits.shape[-1])
            mask_term = F.mse_loss(s_logits[..., :rows, :cols], t_logits[..., :rows, :cols])
            losses.append(mask_term + F.mse_loss(s_iou, t_iou))
    return torch.stack(losses).mean()
