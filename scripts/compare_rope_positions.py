#!/usr/bin/env python
"""Compare the two RoPE placements of merged tokens on DINOv3: "grid" against "tokens".

After a CubistMerge reduction the later blocks of a RoPE model need positions for the merged
tokens. ``rope="grid"`` (default, the paper's) gives them a regular H' x W' grid over the same
image extent; ``rope="tokens"`` puts every merged token at the mean position of its original
patches. This script measures, on a random-weight ``vit_small_patch16_dinov3`` (no weights are
downloaded), how close the recovered final features of the merged model stay to the unmerged
model's (cosine similarity and relative L2 error of all patch tokens, averaged over images),
and prints a markdown table.

What random weights can and cannot show: the model's default LayerScale (1e-5) makes every
block almost the identity, so LayerScale is set to ``--init-values`` (1.0) for the blocks to
matter at all. With random q/k projections attention is nearly uniform and positions barely
matter either; ``--qk-scales`` multiplies the query and key projections so that attention
logits get large enough for RoPE to shape attention (1 = the random init as is). As a control
of how large a position error looks, the "crop" columns give the reduced grid the positions of
the top-left H' x W' patches of the input grid (spacing kept, extent shrunk): a deliberately
wrong choice. Differences between the columns are the effect of positions alone; the rest of
the error is the merge itself (the same in every column).

    python scripts/compare_rope_positions.py                 # about 3 minutes on 2 CPU cores
    python scripts/compare_rope_positions.py --sizes 224 --qk-scales 1
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import timm
import torch
import torch.nn.functional as F

import cubistmerge
from cubistmerge.patch import timm_eva

PLACEMENTS = ("grid", "tokens", "crop")


def smooth_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """Random images with spatial structure: low-resolution noise upsampled, plus a little fine noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 3, max(size // 32, 2), max(size // 32, 2), generator=generator)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return images + 0.1 * torch.randn(batch, 3, size, size, generator=generator)


def make_model(name: str, init_values: float, qk_scale: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, init_values=init_values).eval()
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.weight.shape[0] // 3
            block.attn.qkv.weight[: 2 * dim] *= qk_scale  # queries and keys
    return model


@contextlib.contextmanager
def cropped_grid_positions() -> Iterator[None]:
    """Control: the reduced grid takes the positions of the input grid's top-left H' x W' patches."""
    original = timm_eva.regular_grid_coordinates
    timm_eva.regular_grid_coordinates = lambda grid, reduced, device=None: timm_eva.patch_coordinates(reduced, device)
    try:
        yield
    finally:
        timm_eva.regular_grid_coordinates = original


def patch_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images)[:, model.num_prefix_tokens :].float()


def similarity(features: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(features.flatten(1), reference.flatten(1), dim=1).mean().item()
    relative = ((features - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).mean().item()
    return cosine, relative


def measure(model: torch.nn.Module, images: torch.Tensor, r: float, loc: int) -> dict[str, tuple[float, float]]:
    reference = patch_features(model, images)
    results = {}
    for placement in PLACEMENTS:
        crop = placement == "crop"
        cubistmerge.patch(model, "cubist", r=r, loc=loc, rope="grid" if crop else placement)
        with cropped_grid_positions() if crop else contextlib.nullcontext():
            results[placement] = similarity(patch_features(model, images), reference)
        cubistmerge.unpatch(model)
    return results


def reduced_grid(grid: int, r: float) -> int:
    removed = r if isinstance(r, int) else int(r * grid + 0.5)
    return grid - removed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_dinov3")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--r", type=str, nargs="+", default=["1", "2", "0.1"], help="ints or fractions")
    parser.add_argument("--loc", type=int, default=1, help="block whose input is reduced")
    parser.add_argument("--qk-scales", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--init-values", type=float, default=1.0, help="LayerScale of the random blocks")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    amounts = [float(v) if "." in v else int(v) for v in args.r]

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    print(
        f"{args.model}, random weights (LayerScale {args.init_values}), CubistMerge at block {args.loc}, "
        f"{args.batch_size} smooth random images; recovered patch features vs the unmerged model.\n"
    )
    header = (
        "| q/k scale | image | r | grid | "
        + " | ".join(f"cos {p}" for p in PLACEMENTS)
        + " | "
        + " | ".join(f"rel. err {p}" for p in PLACEMENTS)
        + " |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for qk_scale in args.qk_scales:
        model = make_model(args.model, args.init_values, qk_scale, args.seed)
        patch = model.patch_embed.patch_size[0]
        for size in args.sizes:
            images = smooth_images(args.batch_size, size, args.seed + 1)
            side = size // patch
            for r in amounts:
                results = measure(model, images, r, args.loc)
                reduced = reduced_grid(side, r)
                cosines = " | ".join(f"{results[p][0]:.5f}" for p in PLACEMENTS)
                errors = " | ".join(f"{results[p][1]:.4f}" for p in PLACEMENTS)
                print(
                    f"| {qk_scale:g} | {size} | {r} | {side}x{side} -> {reduced}x{reduced} | {cosines} | {errors} |",
                    flush=True,
                )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
