"""CubistMerge and ToMe on timm HieraDet (the SAM 2 Hiera image encoder trunk, sam2_hiera_*)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.hiera import Hiera, Unroll

import cubistmerge
from cubistmerge.flops import count_flops
from cubistmerge.merge import cubist as cubist_module
from cubistmerge.merge.cubist import cubist_merge
from cubistmerge.merge.windows import cubist_merge_windows, merge_apply_unmerge_in_windows
from cubistmerge.patch import UnsupportedModelError, timm_hiera

from .._precision import low_precision_errors

NAMES = ["sam2_hiera_tiny", "sam2_hiera_small", "sam2_hiera_base_plus", "sam2_hiera_large"]
# 224: stage grids 56 / 28 / 14 / 7 with the SAM 2 windows 8 / 4 / 14 / 7 (16 / 8 for large)
IMG = 224


def make_model(name: str = "sam2_hiera_tiny", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, embed_dim=8, num_heads=1, num_classes=5, **kwargs)
    torch.nn.init.normal_(model.head.fc.weight)  # timm zero-initialises the classifier: logits would hide merging
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def reducible_loc(model) -> int:
    """A windowed block inside the third stage (after its q-pooling block)."""
    return model.stage_ends[1] + 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("windows", ["window", "grid"])
def test_no_reduction_equals_unpatched(name, windows, images):
    model = make_model(name)
    with torch.no_grad():
        features, logits = model.forward_features(images), model(images)
        cubistmerge.patch(model, "cubist", r=0, loc=reducible_loc(model), windows=windows)
        assert (model.forward_features(images) - features).abs().max() <= 1e-5
        assert (model(images) - logits).abs().max() <= 1e-5
        cubistmerge.patch(model, "tome", r=0)
        assert (model.forward_features(images) - features).abs().max() <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_reduction_keeps_every_output_shape_and_unpatch_restores(name, images):
    model = make_model(name)
    original, attributes = type(model), set(model.__dict__)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = images.clone()
    with torch.no_grad():
        features, logits = model.forward_features(images), model(images)
        final, coarse = model.forward_intermediates(images)
        fine = model.forward_intermediates(images, indices=[0, 4, 6], coarse=False, output_fmt="NHWC")
        cubistmerge.patch(model, "cubist", stages=[(0, 2), (reducible_loc(model), 3)])
        merged = model.forward_features(images)
        assert merged.shape == features.shape and (merged - features).abs().max() > 1e-3
        assert model(images).shape == logits.shape
        final_m, coarse_m = model.forward_intermediates(images)
        assert final_m.shape == final.shape and [t.shape for t in coarse_m] == [t.shape for t in coarse]
        assert torch.equal(final_m, merged)
        fine_m = model.forward_intermediates(images, indices=[0, 4, 6], coarse=False, output_fmt="NHWC")
        assert [t.shape for t in fine_m[1]] == [t.shape for t in fine[1]]
        only = model.forward_intermediates(images, indices=2, intermediates_only=True, stop_early=True)
        assert [t.shape for t in only] == [t.shape for t in coarse[-2:]]
        assert torch.equal(only[0], coarse_m[-2])
    assert torch.equal(images, kept)
    assert set(model.__dict__) - attributes == {
        "_cubistmerge_original_class",
        "_cubistmerge_options",
        "_cubistmerge_family",
    }  # nothing of a forward stays on the model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    cubistmerge.unpatch(model)
    assert type(model) is original and set(model.__dict__) == attributes
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), features)
        assert torch.equal(model(images), logits)


# ---- the hand-built reference ------------------------------------------------------------------------------


def hand_pos_embed(model, x: torch.Tensor) -> torch.Tensor:
    """HieraDet's position embedding from its parameters: resized global table plus the tiled window table."""
    h, w = x.shape[1:3]
    table = F.interpolate(model.pos_embed, size=(h, w), mode="bicubic")
    window = model.pos_embed_window
    table = table + window.tile((h // window.shape[-2], w // window.shape[-1]))
    return x + table.permute(0, 2, 3, 1)


def reference_forward(model, images: torch.Tensor, windows: str, plan: dict[int, tuple[int, int]]):
    """The reduced forward written out: embed, blocks, ``cubist_merge`` (per window or on the grid) at the
    planned blocks, the windowed blocks of the rest of the stage given the reduced window (on a copy), and
    the grid recovered before the next q-pooling block. Returns the final grid and the stage-end outputs."""
    ref = copy.deepcopy(model)
    x = hand_pos_embed(ref, ref.patch_embed.proj(images).permute(0, 2, 3, 1))
    recover, stage_outputs = None, []
    for i, block in enumerate(ref.blocks):
        if block.q_stride is not None and recover is not None:
            x, recover = recover(x), None
        if i in plan:
            r_h, r_w = plan[i]
            end = i
            while end + 1 < len(ref.blocks) and ref.blocks[end + 1].q_stride is None:
                end += 1
            stage = ref.blocks[i : end + 1]
            if windows == "window":
                window = next(b.window_size for b in stage if b.is_windowed)
                x, step, reduced = cubist_merge_windows(x, window, r_h, r_w)
                for b in stage:
                    if b.is_windowed:
                        b.window_size = reduced
            else:
                x, step = cubist_merge(x, r_h, r_w)
            recover = step if recover is None else recover.then(step)
        x = block(x)
        if i in ref.stage_ends:
            stage_outputs.append(x if recover is None else recover(x))
    return (x if recover is None else recover(x)), stage_outputs


CASES = [
    # SAM 2 windows: stage 0 (56x56 in 8x8 windows), stage 2 (14x14 in one 14x14 window, with global blocks)
    ("window", {}, {0: (2, 1), 4: (3, 3), 6: (1, 2)}),
    ("grid", {}, {0: (2, 1), 4: (3, 3), 6: (1, 2)}),
    # windows that leave edge windows: stage 1 28x28 in 6x6, stage 2 14x14 in 6x6, stage 3 7x7 in 3x3
    ("window", {"window_spec": (8, 6, 6, 3)}, {2: (2, 2), 4: (1, 2), 8: (1, 1), 11: (1, 1)}),
    ("grid", {"window_spec": (8, 6, 6, 3)}, {2: (2, 2), 4: (1, 2), 8: (1, 1), 11: (1, 1)}),
]


@pytest.mark.parametrize("windows,config,plan", CASES)
def test_cubist_equals_the_hand_built_forward(windows, config, plan, images):
    model = make_model("sam2_hiera_tiny", **config)
    stages = [(loc, r_h, r_w) for loc, (r_h, r_w) in plan.items()]
    with torch.no_grad():
        unreduced = model.forward_features(images)
        assert (reference_forward(model, images, windows, {})[0] - unreduced).abs().max() <= 1e-5
        expected, expected_stages = reference_forward(model, images, windows, plan)
        assert (expected - unreduced).abs().max() > 1e-3
        cubistmerge.patch(model, "cubist", stages=stages, windows=windows)
        final, stage_outputs = model.forward_intermediates(images, output_fmt="NHWC")
    assert (final - expected).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(stage_outputs, expected_stages, strict=True))


def _attention_inputs(model, images) -> list[tuple[int, ...]]:
    seen = []
    hooks = [
        b.attn.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[:3]))) for b in model.blocks
    ]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen


def test_window_and_grid_modes_shape_the_attention(images):
    model = make_model("sam2_hiera_tiny", window_spec=(8, 6, 6, 3))
    full = _attention_inputs(model, images)
    cubistmerge.patch(model, "cubist", r=1, loc=4, windows="window")
    windowed = _attention_inputs(model, images)
    # stage 2 (blocks 4-9): 14 = 6 + 6 + 2 -> windows of 5, the 2-token edge loses 1: grid 5 + 5 + 1 = 11
    assert full[4:10] == [(18, 6, 6), (2, 14, 14), (18, 6, 6), (2, 14, 14), (18, 6, 6), (2, 14, 14)]
    assert windowed[4:10] == [(18, 5, 5), (2, 11, 11), (18, 5, 5), (2, 11, 11), (18, 5, 5), (2, 11, 11)]
    assert windowed[:4] == full[:4] and windowed[10:] == full[10:]  # recovered before the q-pooling block 10
    cubistmerge.patch(model, "cubist", r=2, loc=4, windows="grid")
    # 14 -> 12: exactly 2x2 windows of 6
    assert _attention_inputs(model, images)[4:6] == [(8, 6, 6), (2, 12, 12)]


def test_batch_independence_dtypes_and_gradients(images):
    model = cubistmerge.patch(make_model(), "cubist", stages=[(0, 2), (4, 3)])
    with torch.no_grad():
        together = model.forward_features(images)
        alone = torch.cat([model.forward_features(images[i : i + 1]) for i in range(2)])
        assert (together - alone).abs().max() <= 1e-5
        double = copy.deepcopy(model).double().forward_features(images.double())
    assert double.dtype == torch.float64 and (double.float() - together).abs().max() <= 1e-4
    # bf16: about as close to float32 as the unmerged model is (the float32 run replays the bf16 matching)
    merged = cubistmerge.patch(make_model(), "cubist", stages=[(0, 2), (4, 3)], representation="mean")
    errors = low_precision_errors(
        make_model(),
        merged,
        images,
        torch.bfloat16,
        lambda m, x: m.forward_features(x),
        choices=((cubist_module, "match_neighbours"),),
    )
    assert errors[1] <= 2 * errors[0]
    model.train()
    model(images).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[f"blocks.{i}.attn.qkv.weight"].abs().sum() > 0 for i in range(len(model.blocks)))
    assert grads["pos_embed"].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(images):
    model = cubistmerge.patch(make_model(), "cubist", stages=[(0, 2), (4, 3)]).train()
    model(images).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).square().mean().backward()
    assert all((p.grad - expected[n]).abs().max() <= 1e-6 for n, p in model.named_parameters())


def test_merged_model_counts_fewer_flops(images):
    model = make_model()
    unmerged = count_flops(model, images[:1])
    cubistmerge.patch(model, "cubist", stages=[(0, 2), (4, 3)])
    merged = count_flops(model, images[:1])
    assert 0 < merged < unmerged


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(r=1, loc=1), "block 1 cannot reduce: it opens stage 2 by q-pooling.*can: 0, 2, 4-9, 11"),
        (dict(r=1, loc=10), "block 10 cannot reduce"),
        (dict(r=5, loc=0), "at most 4 per window column"),  # windows of 8
        (dict(stages=[(4, 4), (6, 6)]), "inside 10x10 windows"),  # 14 -> 10, then at most 5
        (dict(r=1, loc=0, windows="tiles"), "windows must be one of"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        cubistmerge.patch(make_model(), "cubist", **options)


def test_bad_inputs_and_refused_methods(images):
    model = cubistmerge.patch(make_model(), "cubist", r=6, loc=4, windows="grid")  # stage 2 grid: 14 at 224
    with torch.no_grad():
        model.forward_features(images)
        with pytest.raises(ValueError, match="removes 0 to 5 tokens"):
            model.forward_features(images[..., :160, :160])  # stage 2 grid: 10
        with pytest.raises(ValueError, match="norm must be False"):
            model.forward_intermediates(images, norm=True)
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(images, output_fmt="NLC")
    with pytest.raises(UnsupportedModelError, match="not available for timm HieraDet"):
        cubistmerge.patch(make_model(), "expedite", r=1, loc=0)
    with pytest.raises(UnsupportedModelError, match="prop_attn"):
        cubistmerge.patch(make_model(), "cubist", r=1, loc=0, prop_attn=True)
    with pytest.raises(ValueError, match="at most 8 in block 2"):
        cubistmerge.patch(make_model(), "tome", r=9)  # stage 1 windows of 4
    with pytest.raises(ValueError, match="trace_source"):
        cubistmerge.patch(make_model(), "tome", r=2, trace_source=True)


def test_tome_merges_around_the_mlp_only(images):
    model = make_model()
    full = _attention_inputs(model, images)
    with torch.no_grad():
        expected = model.forward_features(images)
    r = [3, 5, 5, 5, 20, 20, 0, 0, 0, 0, 0, 0]
    cubistmerge.patch(model, "tome", r=r)
    mlp_tokens = []
    hooks = [
        b.mlp.register_forward_pre_hook(lambda _m, args: mlp_tokens.append(args[0].shape[:-1].numel()))
        for b in model.blocks
    ]
    assert _attention_inputs(model, images) == full  # attention never sees merged tokens
    for h in hooks:
        h.remove()
    # block 0: 49 windows of 8x8 per image; block 1 q-pools (unmerged); block 2: 49 windows of 4x4; block 3
    # q-pools; blocks 4 (14x14 window) and 5 (global, tiled by the stage's 14x14 windows): one tile each
    assert mlp_tokens[:6] == [
        2 * (56 * 56 - 49 * 3),
        2 * 28 * 28,
        2 * (28 * 28 - 49 * 5),
        2 * 14 * 14,
        2 * (14 * 14 - 20),
        2 * (14 * 14 - 20),
    ]
    with torch.no_grad():
        out = model.forward_features(images)
    assert out.shape == expected.shape and (out - expected).abs().max() > 1e-4


def test_trace_source_maps_the_last_stage_grid(images):
    model = make_model()
    cubistmerge.patch(model, "cubist", r=2, loc=4, trace_source=True)  # recovered before the last stage
    with torch.no_grad():
        model(images)
    assert torch.equal(model.cubistmerge_source, torch.arange(49).expand(2, 49))
    cubistmerge.patch(model, "cubist", r=1, loc=11, trace_source=True)  # the 7x7 stage: one 7x7 window -> 6x6
    with torch.no_grad():
        model(images)
    source = model.cubistmerge_source
    assert source.shape == (2, 49)
    assert all(torch.equal(torch.unique(source[b]), torch.arange(36)) for b in range(2))
    cubistmerge.unpatch(model)
    assert not hasattr(model, "cubistmerge_source")


def test_tome_equals_the_hand_built_forward(images):
    """ToMe in block 4 only (one 14x14 window on the 14x14 grid, 4 heads): the block written out, matching on its
    attention keys averaged over heads, the MLP run on the merged tokens and unmerged before the residual."""
    model = make_model()
    r = [0] * len(model.blocks)
    r[4] = 20
    with torch.no_grad():
        x = hand_pos_embed(model, model.patch_embed.proj(images).permute(0, 2, 3, 1))
        for i, block in enumerate(model.blocks):
            if i != 4:
                x = block(x)
                continue
            normed = block.norm1(x)
            B, H, W, _ = normed.shape
            heads = block.attn.num_heads
            keys = block.attn.qkv(normed).view(B, H * W, 3, heads, -1)[:, :, 1].mean(2).view(B, H, W, -1)
            x = x + block.attn(normed)
            x = x + merge_apply_unmerge_in_windows(block.norm2(x), 14, 20, block.mlp, metric=keys)
        cubistmerge.patch(model, "tome", r=r)
        out = model.forward_features(images)
    assert heads == 4 and (out - x).abs().max() <= 1e-5
    cubistmerge.unpatch(model)
    with torch.no_grad():
        assert (model.forward_features(images) - x).abs().max() > 1e-4


# ---- Hiera (mask units) -------------------------------------------------------------------------------------

HIERA_NAMES = ["hiera_tiny_224", "hiera_small_abswin_256"]


def make_hiera(name: str = "hiera_tiny_224", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, embed_dim=8, num_heads=1, num_classes=5, **kwargs)
    torch.nn.init.normal_(model.head.fc.weight)
    return model.eval()


def hiera_images(model, batch: int = 2) -> torch.Tensor:
    size = model.pretrained_cfg["input_size"][-1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", HIERA_NAMES)
def test_hiera_no_reduction_equals_unpatched_and_unpatch_restores(name):
    model = make_hiera(name)
    images = hiera_images(model)
    with torch.no_grad():
        features, logits = model.forward_features(images), model(images)
        final, stages = model.forward_intermediates(images)
        cubistmerge.patch(model, "cubist", stages=[(0, 0), (2, 0), (4, 0)])
        assert (model.forward_features(images) - features).abs().max() <= 1e-5
        assert (model(images) - logits).abs().max() <= 1e-5
        cubistmerge.patch(model, "cubist", stages=[(0, 2), (2, 1), (4, 0.25)])
        merged = model.forward_features(images)
        final_m, stages_m = model.forward_intermediates(images)
        _, stages_f = model.forward_features(images, return_intermediates=True)
    assert merged.shape == features.shape and (merged - features).abs().max() > 1e-3
    assert torch.equal(final_m, merged) and final_m.shape == final.shape
    assert [t.shape for t in stages_m] == [t.shape for t in stages]
    assert all(torch.equal(a.permute(0, 3, 1, 2), b) for a, b in zip(stages_f, stages_m, strict=True))
    cubistmerge.unpatch(model)
    assert type(model).__name__ == "Hiera"
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), features)


@pytest.mark.parametrize("block_index,unit", [(0, (8, 8)), (2, (4, 4))])
def test_hiera_unit_order_runs_blocks_as_hiera_does(block_index, unit):
    model = make_hiera()
    images = hiera_images(model)
    with torch.no_grad():
        x = model.unroll(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:block_index]:
            x = block(x)
        block = model.blocks[block_index]
        grid = model.reroll(x, block_index)
        expected = model.reroll(block(x), block_index)
        tokens = timm_hiera.to_unit_order(grid, unit)
        assert torch.equal(timm_hiera.from_unit_order(tokens, grid.shape[1:3], unit), grid)
        units = (grid.shape[1] // unit[0]) * (grid.shape[2] // unit[1])
        out = timm_hiera.hiera_block_forward(block, tokens, units)
    assert (timm_hiera.from_unit_order(out, grid.shape[1:3], unit) - expected).abs().max() <= 1e-5


def hiera_reference(model, images: torch.Tensor, plan: dict[int, tuple[int, int]]):
    """Hiera with reductions written out on the grid: mask-unit attention as global attention on every (reduced)
    unit taken as a batch entry, every other step token-wise or global; timm's Unroll / Reroll only around the
    blocks that run in Hiera's order (before any reduction of a stage, and the q-pooling blocks)."""
    ref = copy.deepcopy(model)
    x = ref.patch_embed.proj(images).flatten(2).transpose(1, 2) + ref.pos_embed  # (B, N, C) raster
    B = x.shape[0]
    x = ref.unroll(x)
    grid, recover, unit, stage_outputs = None, None, None, []
    for i, block in enumerate(ref.blocks):
        if block.attn.q_stride > 1 and recover is not None:
            schedule, size = ref.reroll.schedule[i - 1]
            x = Unroll(size, [1, 1], schedule)(recover(grid).reshape(B, -1, grid.shape[-1]))
            grid, recover = None, None
        if i in plan:
            if grid is None:
                grid = ref.reroll(x, i)
                end = i
                while end + 1 < len(ref.blocks) and ref.blocks[end + 1].attn.q_stride == 1:
                    end += 1
                mask_units = any(b.attn.use_mask_unit_attn for b in ref.blocks[i : end + 1])
                pools = sum(b.attn.q_stride > 1 for b in ref.blocks[: i + 1])
                unit = (8 // 2**pools, 8 // 2**pools) if mask_units else None
            if unit is None:
                grid, step = cubist_merge(grid, *plan[i])
            else:
                grid, step, unit = cubist_merge_windows(grid, unit, *plan[i])
            recover = step if recover is None else recover.then(step)
        if grid is None:
            x = block(x)
        elif block.attn.use_mask_unit_attn:
            H, W = grid.shape[1:3]
            nh, nw = H // unit[0], W // unit[1]
            tiles = grid.reshape(B, nh, unit[0], nw, unit[1], -1).permute(0, 1, 3, 2, 4, 5)
            tiles = tiles.reshape(B * nh * nw, unit[0] * unit[1], -1)
            block.attn.use_mask_unit_attn = False  # the copy's block: global attention inside one unit
            tiles = block(tiles)
            tiles = tiles.reshape(B, nh, nw, unit[0], unit[1], -1).permute(0, 1, 3, 2, 4, 5)
            grid = tiles.reshape(B, H, W, -1)
        else:
            grid = block(grid.reshape(B, -1, grid.shape[-1])).reshape(*grid.shape[:3], -1)
        if i in ref.stage_ends:
            stage_outputs.append(ref.reroll(x, i) if grid is None else recover(grid))
    return (x if grid is None else recover(grid).reshape(B, -1, grid.shape[-1])), stage_outputs


def test_hiera_equals_the_hand_built_forward():
    model = make_hiera()
    images = hiera_images(model)
    # stage 1: 8x8 units -> 6x7; stage 2: 4x4 units -> 3x3; stage 3 (global attention after its q-pooling block):
    # the 14x14 grid -> 12x12 -> 11x10; stage 4 (7x7, global): -> 6x6
    plan = {0: (2, 1), 2: (1, 1), 4: (2, 2), 6: (1, 2), 11: (1, 1)}
    with torch.no_grad():
        unreduced = model.forward_features(images)
        assert (hiera_reference(model, images, {})[0] - unreduced).abs().max() <= 1e-5
        expected, expected_stages = hiera_reference(model, images, plan)
        assert (expected - unreduced).abs().max() > 1e-3
        cubistmerge.patch(model, "cubist", stages=[(loc, r_h, r_w) for loc, (r_h, r_w) in plan.items()])
        final, stage_outputs = model.forward_intermediates(images, output_fmt="NHWC")
        together = model.forward_features(images)
        alone = torch.cat([model.forward_features(images[i : i + 1]) for i in range(2)])
    assert (final - expected).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(stage_outputs, expected_stages, strict=True))
    assert (together - alone).abs().max() <= 1e-5
    model.train()
    model(images).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(block.attn.qkv.weight.grad.abs().sum() > 0 for block in model.blocks)
    cubistmerge.patch(model, "cubist", stages=[(0, 2), (4, 2)]).eval()
    with torch.no_grad():
        double = copy.deepcopy(model).double().forward_features(images.double())
        half = copy.deepcopy(model).bfloat16().forward_features(images.bfloat16())
    assert double.dtype == torch.float64 and half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert count_flops(model, images[:1]) < count_flops(cubistmerge.unpatch(copy.deepcopy(model)), images[:1])


def test_hiera_errors():
    with pytest.raises(ValueError, match="block 1 cannot reduce"):
        cubistmerge.patch(make_hiera(), "cubist", r=1, loc=1)
    with pytest.raises(ValueError, match="needs whole mask units.*windows='window'"):
        cubistmerge.patch(make_hiera(), "cubist", r=1, loc=0, windows="grid")
    cubistmerge.patch(make_hiera(), "cubist", r=1, loc=4, windows="grid")  # stage 3 attends globally
    with pytest.raises(ValueError, match="inside 8x8 mask units"):
        cubistmerge.patch(make_hiera(), "cubist", r=5, loc=0)
    with pytest.raises(ValueError, match="on a 10x10 grid"):
        cubistmerge.patch(make_hiera(), "cubist", stages=[(4, 4), (6, 6)])  # stage 3: 14x14 -> 10x10
    with pytest.raises(UnsupportedModelError, match="ToMe is not available for timm Hiera"):
        cubistmerge.patch(make_hiera(), "tome", r=2)
    model = cubistmerge.patch(make_hiera(), "cubist", r=1, loc=0)
    images = hiera_images(model)
    with pytest.raises(ValueError, match="no MAE mask"), torch.no_grad():
        model(images, mask=torch.ones(2, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm must be False"), torch.no_grad():
        model.forward_intermediates(images, norm=True)
    video = Hiera(
        img_size=(4, 32, 32),
        embed_dim=8,
        num_heads=1,
        stages=(1, 1, 1, 1),
        q_pool=2,
        patch_kernel=(3, 7, 7),
        patch_stride=(2, 4, 4),
        patch_padding=(1, 3, 3),
        q_stride=(1, 2, 2),
        mask_unit_size=(1, 4, 4),
        sep_pos_embed=True,
    )
    with pytest.raises(UnsupportedModelError, match="only 2-D"):
        cubistmerge.patch(video, "cubist", r=1, loc=0)


def test_hiera_trace_source_maps_the_last_stage_grid():
    model = make_hiera()
    images = hiera_images(model)
    cubistmerge.patch(model, "cubist", r=1, loc=11, trace_source=True)  # the last stage: 7x7 grid -> 6x6
    with torch.no_grad():
        model(images)
    source = model.cubistmerge_source
    assert source.shape == (2, 49)
    assert all(torch.equal(torch.unique(source[b]), torch.arange(36)) for b in range(2))
    cubistmerge.patch(model, "cubist", r=1, loc=0, trace_source=True)  # recovered before the q-pooling
    with torch.no_grad():
        model(images)
    assert torch.equal(model.cubistmerge_source, torch.arange(49).expand(2, 49))
