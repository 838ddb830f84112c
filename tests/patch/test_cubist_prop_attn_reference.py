"""CubistMerge with proportional attention (``prop_attn=True``) on timm ViTs equals a hand-built forward (float64).

The reference runs the model's own submodules block by block; at each stage's block it merges the patch grid
with the loop reference of CubistMerge (``tests/merge/reference.py``), counts how many original patches every
merged token stands for (summed over stages), and from then on adds log(size) of every key to the attention
logits (written out by hand in ``hand_attention``). Without ``prop_attn`` the patched model must not add it.
"""

from __future__ import annotations

import pytest
import torch

import cubistmerge

from ..merge import reference as ref
from .test_after_attention_reference import hand_attention, images_for, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ["vit_small_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"]


def cubist_prop_reference(model, images, stages, representation, metric, prop_attn=True):
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B, N0, C = x.shape
    p = model.num_prefix_tokens
    H, W = model.patch_embed.grid_size
    sizes = [[1.0] * N0 for _ in range(B)]
    merged_yet = False
    at = {loc: (r_h, r_w) for loc, r_h, r_w in stages}
    for i, block in enumerate(model.blocks):
        if i in at:
            r_h, r_w = at[i]
            grid = x[:, p:].reshape(B, H, W, C).tolist()
            merged, index = ref.cubist_merge_batch(grid, r_h, r_w, representation, metric)
            H, W = H - r_h, W - r_w
            patches = torch.tensor(merged, dtype=x.dtype).reshape(B, H * W, C)
            x = torch.cat([x[:, :p], patches], dim=1)
            new_sizes = []
            for b in range(B):
                counts = [0.0] * (H * W)
                for t, slot in enumerate(index[b]):
                    counts[slot] += sizes[b][p + t]
                new_sizes.append(sizes[b][:p] + counts)
            sizes = new_sizes
            merged_yet = True
        out, _ = hand_attention(block.attn, block.norm1(x), sizes if prop_attn and merged_yet else None)
        x = x + block.ls1(out)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(
    ("stages", "representation", "metric"),
    [([(1, 1, 1)], "maxmag", "cosine"), ([(1, 2, 1), (3, 1, 2)], "mean", "l2")],
    ids=["one-stage", "two-stages"],
)
def test_prop_attn_equals_the_hand_built_forward(key, stages, representation, metric):
    model = make_model(key)
    images = images_for(model)
    patched = cubistmerge.patch(
        make_model(key), "cubist", stages=stages, representation=representation, metric=metric, prop_attn=True
    )
    with torch.no_grad():
        expected = cubist_prop_reference(model, images, stages, representation, metric)
        without = cubist_prop_reference(model, images, stages, representation, metric, prop_attn=False)
        got = patched(images)
    assert (got - expected).abs().max() < 1e-10
    # The sizes matter: the same setting without proportional attention is far from it.
    assert (without - expected).abs().max() > 1e-4
    plain = cubistmerge.patch(make_model(key), "cubist", stages=stages, representation=representation, metric=metric)
    with torch.no_grad():
        assert (plain(images) - without).abs().max() < 1e-10


def test_prop_attn_is_refused_where_it_does_not_run_and_checked():
    import timm

    eva = timm.create_model("vit_small_patch16_rope_224", pretrained=False, img_size=64, depth=2)
    with pytest.raises(cubistmerge.UnsupportedModelError, match="prop_attn for CubistMerge runs on timm ViTs"):
        cubistmerge.patch(eva, "cubist", r=1, loc=1, prop_attn=True)
    with pytest.raises(ValueError, match="prop_attn must be True or False"):
        cubistmerge.patch(make_model(KEYS[0]), "cubist", r=1, loc=1, prop_attn="yes")
