"""The tuner on a tiny random-weight ViT with a fake timer: it returns the best candidate meeting the target,
says so when none does, and its setting files round-trip through ``cubistmerge.patch``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import cubistmerge
from cubistmerge.flops import count_flops
from cubistmerge.tuning import TuneError, candidate_settings, fidelity, tune

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [
    "cubist r=1 loc=1",
    "cubist r=1 loc=1 metric=l2",
    "cubist r=2 loc=1",
    "cubist r=2 loc=2 representation=mean",
    "cubist r=1 loc=3",
    "tome r=4",
    "tome r=8",
]


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10, init_values=0.5
    )
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    smooth = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(smooth, size=(64, 64), mode="bilinear")


def flop_timer(efficiency: float, log: list | None = None):
    """Seconds = FLOPs / efficiency for merged modules (the first module is the unmerged reference)."""

    def timer(modules, example):
        flops = [count_flops(m, example[:1]) for m in modules]
        if log is not None:
            log.append(len(modules))
        return [[flops[0]]] + [[f / efficiency] for f in flops[1:]]

    return timer


def brute_force(model, images, settings, target, efficiency):
    """Every setting's fidelity on every image and its fake speed-up: the answer an exhaustive search gives."""
    with torch.no_grad():
        reference = model(images)
    base = count_flops(model, images[:1])
    best = None
    for text in settings:
        merged = cubistmerge.patch(copy.deepcopy(model), setting=text)
        speedup = efficiency * base / count_flops(merged, images[:1])
        with torch.no_grad():
            score = fidelity("classifier", merged(images), reference)["score"]
        if speedup >= target and (best is None or score > best[1]):
            best = (text, score, speedup)
    return best


@pytest.mark.parametrize("target", [1.1, 1.3])
def test_returns_the_best_fidelity_that_meets_the_target(images, target):
    model = tiny_vit()
    result = tune(
        model,
        images,
        target,
        settings=SETTINGS,
        calibration_images=8,
        first_rung=8,
        finalists=len(SETTINGS),
        flop_slack=0.5,
        timer=flop_timer(0.9),
        progress=False,
    )
    expected = brute_force(model, images, SETTINGS, target, 0.9)
    assert result.met and result.setting == expected[0]
    assert result.fidelity["score"] == pytest.approx(expected[1], rel=1e-6)
    assert result.speedup == pytest.approx(expected[2]) and result.speedup >= target
    assert type(model) is VisionTransformer  # the model given is not patched


def test_says_so_when_no_setting_meets_the_target(images):
    result = tune(
        tiny_vit(),
        images,
        1.3,
        settings=SETTINGS,
        calibration_images=4,
        first_rung=4,
        flop_slack=0.5,
        timer=flop_timer(0.3),
        progress=False,
    )
    assert not result.met and "No setting met 1.3x" in result.message
    timed = [c for c in result.candidates if c.speedup is not None]
    assert result.speedup == max(c.speedup for c in timed) < 1.3


def test_a_second_round_corrects_the_flop_prune_by_the_measured_efficiency(images):
    log: list[int] = []
    result = tune(
        tiny_vit(),
        images,
        1.2,
        settings=SETTINGS,
        calibration_images=4,
        first_rung=4,
        finalists=1,  # the one first-round finalist is the front's lowest FLOP ratio: it misses at efficiency 0.8
        flop_slack=0.5,
        timer=flop_timer(0.8, log),
        progress=False,
    )
    assert len(log) == 2 and "second round" in result.message
    assert result.met and result.speedup >= 1.2


def test_only_front_settings_are_timed_and_the_pick_equals_the_exhaustive_answer(images):
    """Dominated settings (another of the same method is both faster in FLOPs and more faithful) are never timed,
    and the pick still equals the exhaustive answer."""
    model = tiny_vit()
    result = tune(
        model,
        images,
        1.2,
        settings=SETTINGS,
        calibration_images=8,
        first_rung=8,
        finalists=2,
        flop_slack=0.5,
        timer=flop_timer(0.9),
        progress=False,
    )
    scored = [c for c in result.candidates if c.fidelity]
    timed = [c for c in scored if c.speedup is not None]
    for candidate in timed:
        assert not any(
            o.method == candidate.method and o.flop_ratio >= candidate.flop_ratio and o.score > candidate.score
            for o in scored
            if o is not candidate
        )
    assert any(c.dropped and c.dropped.startswith("dominated") for c in scored)
    assert result.met and result.setting == brute_force(model, images, SETTINGS, 1.2, 0.9)[0]


def test_successive_halving_scores_the_better_half_on_more_images(images):
    result = tune(
        tiny_vit(),
        images,
        1.05,
        settings=SETTINGS,
        calibration_images=8,
        first_rung=2,
        finalists=2,
        flop_slack=0.5,
        timer=flop_timer(1.0),
        progress=False,
    )
    scored = sorted(c.images_scored for c in result.candidates if c.images_scored)
    # 7 candidates on 2 images, the better 4 on 4, the better 2 on 8.
    assert scored == [2, 2, 2, 4, 4, 8, 8]
    assert all("better half" in c.dropped for c in result.candidates if c.images_scored in (2, 4))


def test_flop_prune_and_settings_that_cannot_run(images):
    result = tune(
        tiny_vit(),
        images,
        1.3,
        settings=[*SETTINGS, "cubist r=9 loc=1"],
        calibration_images=2,
        first_rung=2,
        timer=flop_timer(1.0),
        progress=False,
    )
    reasons = {c.setting: c.dropped for c in result.candidates}
    assert reasons["cubist r=9 loc=1"].startswith("cannot run")
    assert reasons["cubist r=1 loc=3"] == "FLOP ratio below 0.85 x target"


def test_candidates_cover_each_family_method():
    pairs = candidate_settings(tiny_vit(), ["cubist", "tome", "expedite", "pitome", "tofu"])
    methods = {m for m, _ in pairs}
    assert methods == {"cubist", "tome", "expedite", "pitome", "tofu"}
    assert ("cubist", {"r": 2, "loc": 1, "metric": "l2", "representation": "mean"}) in pairs
    with pytest.raises(TuneError, match="unknown method"):
        candidate_settings(tiny_vit(), ["magic"])
    sam = timm_sam()
    with pytest.raises(TuneError, match="cannot run"):
        candidate_settings(sam, ["pitome"])


def timm_sam():
    import timm

    return timm.create_model(
        "samvit_base_patch16",
        pretrained=False,
        img_size=64,
        depth=2,
        embed_dim=32,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=2,
    )


def test_bad_input(images, tmp_path):
    with pytest.raises(TuneError, match="target_speedup must be > 1"):
        tune(tiny_vit(), images, 1.0, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image"):
        tune(tiny_vit(), empty, 1.3, progress=False)
    with pytest.raises(TuneError, match="unknown method"):
        tune(tiny_vit(), images, 1.3, methods=("cubist", "fastest"), progress=False)
    with pytest.raises(TuneError, match="no candidate reaches"):
        tune(tiny_vit(), images, 5.0, settings=SETTINGS, calibration_images=2, first_rung=2, progress=False)


def test_setting_files_round_trip_through_patch(images, tmp_path):
    model = tiny_vit()
    result = tune(
        model, images, 1.1, settings=SETTINGS, calibration_images=4, first_rung=4, timer=flop_timer(1.0), progress=False
    )
    path = result.save_setting(tmp_path / "setting.json")
    by_file = cubistmerge.patch(copy.deepcopy(model), setting=path)
    by_kwargs = cubistmerge.patch(copy.deepcopy(model), **json.loads(path.read_text()))
    by_text = cubistmerge.patch(copy.deepcopy(model), setting=result.setting)
    with torch.no_grad():
        expected = by_text(images)
        assert torch.equal(by_file(images), expected) and torch.equal(by_kwargs(images), expected)
        assert not torch.equal(model(images), expected)

    # Pairs come back as pairs: CubistMerge's (r_h, r_w) and its stages.
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"method": "cubist", "stages": [[1, 1, 2], [3, 1, 1]]}))
    a = cubistmerge.patch(copy.deepcopy(model), setting=pairs)
    b = cubistmerge.patch(copy.deepcopy(model), "cubist", stages=[(1, 1, 2), (3, 1, 1)])
    with torch.no_grad():
        assert torch.equal(a(images), b(images))
    with pytest.raises(TypeError, match="either setting="):
        cubistmerge.patch(copy.deepcopy(model), "tome", setting=path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        cubistmerge.patch(copy.deepcopy(model), setting=broken)
    with pytest.raises(FileNotFoundError, match="setting file not found"):
        cubistmerge.patch(copy.deepcopy(model), setting=tmp_path / "missing.json")


def test_result_renders(images, tmp_path):
    result = tune(
        tiny_vit(),
        images,
        1.1,
        settings=SETTINGS,
        calibration_images=4,
        first_rung=2,
        finalists=3,
        timer=flop_timer(1.0),
        progress=False,
    )
    markdown = result.to_markdown()
    assert f"| {result.setting} (chosen) |" in markdown and "better half" in markdown
    json.dumps(result.to_dict())
    assert result.plot(tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"
