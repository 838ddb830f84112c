"""Sweeps: setting parsing, the run over settings on a tiny timm ViT, the result's renderings and plot."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import timm
import torch
from torch import nn

from cubistmerge.bench import RunStats, Variant
from cubistmerge.sweep import SweepConfigError, SweepResult, SweepRow, parse_setting, run_sweep, series_of


@pytest.mark.parametrize(
    ("text", "method", "options"),
    [
        ("cubist", "cubist", {}),
        ("cubist r=2 loc=2", "cubist", {"r": 2, "loc": 2}),
        ("cubist  r=(1,2)   metric=l2", "cubist", {"r": (1, 2), "metric": "l2"}),
        ("cubist r=0.1 windows=grid", "cubist", {"r": 0.1, "windows": "grid"}),
        ("cubist stages=[(2,3,3),(8,1,1)]", "cubist", {"stages": [(2, 3, 3), (8, 1, 1)]}),
        ("tome r=[0,0,49] prop_attn=False", "tome", {"r": [0, 0, 49], "prop_attn": False}),
    ],
)
def test_parse_setting(text, method, options):
    variant = parse_setting(text)
    assert variant.method == method and variant.options == options
    assert variant.name == " ".join(text.split())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("cubist r", "not key=value"),
        ("cubist r=", "not key=value"),
        ("cubist r=1 r=2", "given twice"),
        ("magic r=1", "method must be one of"),
        ("none r=1", "takes no options"),
    ],
)
def test_parse_setting_errors(text, message):
    with pytest.raises(SweepConfigError, match=message):
        parse_setting(text)


def test_series_separates_curves_by_options_other_than_the_amount():
    assert series_of("cubist", {"r": 2, "loc": 2}) == series_of("cubist", {"r": 3, "loc": 2}) == "CubistMerge loc=2"
    # Another place of reduction is another curve: one curve never mixes two.
    assert series_of("cubist", {"r": 3, "loc": 5}) == "CubistMerge loc=5"
    assert series_of("cubist", {"r": 2, "metric": "l2"}) == "CubistMerge metric=l2"
    assert series_of("tome", {"r": [1, 2]}) == "ToMe"
    assert series_of("pitome", {"ratio": 0.9}) == "PiToMe"
    assert series_of("resize", {"size": 196}) == series_of("resize", {"flop_ratio": 1.3}) == "lower resolution"


class _AgreementTask:
    """Top-1 agreement with the unmerged model on random images (enough to exercise the sweep)."""

    name = "toy-agreement"
    primary_metric = "agreement"
    higher_is_better = True

    def __init__(self) -> None:
        self.images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        self.evaluated: list[str] = []

    def speed_module(self, model: nn.Module) -> nn.Module:
        return model

    def speed_input(self) -> torch.Tensor:
        return self.images[:2]

    def evaluate(self, models):
        self.evaluated = list(models)
        self.per_image = {}
        with torch.no_grad():
            reference = models["unmerged"](self.images).argmax(-1)
            metrics = {}
            for label, m in models.items():
                agrees = (m(self.images).argmax(-1) == reference).float()
                self.per_image[label] = {
                    "ids": list(range(4)),
                    "totals": {"agreement": agrees.tolist()},
                    "counts": [1] * 4,
                }
                metrics[label] = {"agreement": float(agrees.mean()), "seen": 4.0}
            return metrics

    def describe(self):
        return {"model": "vit_tiny (random)", "data": "4 random images"}


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, pretrained=False).eval()


def test_run_sweep_measures_every_setting_against_the_unmerged_copy(tiny_vit, tmp_path):
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    task = _AgreementTask()
    settings = ["cubist r=1 loc=1", "cubist r=1 loc=1 metric=l2", Variant("tome", {"r": 2}), "none"]
    result = run_sweep(task, tiny_vit, settings, runs=2, warmup=0, progress=False, command="test")

    # the model given is untouched: not patched, same weights
    assert type(tiny_vit).__name__ == "VisionTransformer"
    assert all(torch.equal(before[k], v) for k, v in tiny_vit.state_dict().items())

    labels = [row.label for row in result.rows]
    assert labels == ["unmerged", "cubist r=1 loc=1", "cubist r=1 loc=1 metric=l2", "tome r=2"]
    assert task.evaluated == labels
    reference = result.reference
    assert reference.method == "none" and reference.flop_ratio == 1.0 and reference.metrics["agreement"] == 1.0
    assert reference.speedup == 1.0
    for row in result.rows[1:]:
        assert row.flop_ratio > 1.0  # a 4x4 grid losing a row and a column, ToMe 2 tokens per block
        assert len(row.ms_per_call.samples) == 2 and len(row.paired_speedup.samples) == 2
        assert row.speedup == pytest.approx(reference.ms_per_call.median / row.ms_per_call.median)
        assert result.delta(row) == pytest.approx(row.metrics["agreement"] - 1.0)
    assert [row.series for row in result.rows] == [
        "unmerged",
        "CubistMerge loc=1",
        "CubistMerge loc=1 metric=l2",
        "ToMe",
    ]
    assert result.setup["command"] == "test" and result.setup["model"] == "vit_tiny (random)"
    assert result.setup["speed_input"] == [2, 3, 64, 64]

    # each row keeps its per-image results, so a change has a paired interval over the images
    for row in result.rows:
        assert row.per_image == task.per_image[row.label]
        interval = result.paired(row, resamples=100)
        assert interval.delta == pytest.approx(result.delta(row)) and interval.images == 4
        assert interval.low <= interval.delta <= interval.high
    assert result.paired(result.rows[1], base=result.rows[2]).delta == pytest.approx(
        result.rows[1].metrics["agreement"] - result.rows[2].metrics["agreement"]
    )

    # renderings
    data = json.loads(result.to_json())
    assert SweepResult.from_dict(data).to_dict() == data
    markdown = result.to_markdown()
    assert "| cubist r=1 loc=1 metric=l2 |" in markdown and "Command: `test`" in markdown
    assert "agreement" in result.to_text() and "Δ agreement" in result.to_text()
    png = tmp_path / "curves.png"
    result.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_aligns_images_by_id_and_leaves_undefined_ones_out():
    def row(label, ids, values, counts):
        return SweepRow(label, "none", {}, label, {"m": 0.0}, 1.0, RunStats.of([1.0]), RunStats.of([1.0]), 1, 1.0,
                        per_image={"ids": ids, "totals": {"m": values}, "counts": counts})  # fmt: skip

    base = row("unmerged", ["a", "b", "c"], [1.0, 2.0, 3.0], [1, 2, 3])
    other = row("x", ["c", "a", "b"], [3.5, float("nan"), 2.5], [3, 1, 2])
    result = SweepResult("t", "m", True, [base, other])
    interval = result.paired(other, resamples=50)
    assert interval.images == 2 and interval.delta == pytest.approx((3.5 + 2.5 - 3.0 - 2.0) / 5)
    with pytest.raises(ValueError, match="no per-image results"):
        result.paired(replace(other, per_image=None))


def test_run_sweep_errors_name_the_setting(tiny_vit):
    task = _AgreementTask()
    with pytest.raises(SweepConfigError, match="cannot apply 'cubist r=3 loc=1'"):
        run_sweep(task, tiny_vit, ["cubist r=3 loc=1"], runs=1, progress=False)  # 4x4 grid: at most 2
    with pytest.raises(SweepConfigError, match="distinct labels"):
        run_sweep(task, tiny_vit, ["tome r=1", "tome r=1"], runs=1, progress=False)
    with pytest.raises(SweepConfigError, match="reserved"):
        run_sweep(task, tiny_vit, [Variant("tome", {"r": 1}, label="unmerged")], runs=1, progress=False)
    with pytest.raises(SweepConfigError, match="runs >= 1"):
        run_sweep(task, tiny_vit, ["tome r=1"], runs=0, progress=False)


def _row(label: str, speedup: float, quality: float, method: str = "cubist") -> SweepRow:
    stats = RunStats.of([1.0])
    return SweepRow(label, method, {}, label, {"q": quality}, speedup, stats, stats, 1, speedup)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_pareto_front_and_best_at(higher_is_better):
    sign = 1 if higher_is_better else -1
    rows = [
        _row("unmerged", 1.0, sign * 1.0, "none"),
        _row("a", 1.2, sign * 0.9),
        _row("b", 1.3, sign * 0.95),  # beats a on both
        _row("c", 1.5, sign * 0.8),
        _row("d", 1.4, sign * 0.7),  # slower and worse than c
        _row("e", 1.1, sign * 0.99),
    ]
    result = SweepResult("toy", "q", higher_is_better, rows)
    assert [r.label for r in result.pareto_front()] == ["unmerged", "e", "b", "c"]
    assert [r.label for r in result.pareto_front(lambda r: -r.speedup)] == ["unmerged"]  # slower is "faster" here
    assert result.best_at(1.2).label == "b"
    assert result.best_at(1.45).label == "c"
    assert result.best_at(1.6) is None


class _KeepModelsTask(_AgreementTask):
    def evaluate(self, models):
        self.models = dict(models)
        return super().evaluate(models)


def test_a_setting_with_a_checkpoint_runs_the_distilled_student(tiny_vit, tmp_path):
    from PIL import Image

    from cubistmerge.train import distill, read_checkpoint

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{k}.png")
    student = tmp_path / "student.pt"
    distill(tiny_vit, folder, "cubist r=1 loc=1", epochs=1, lr=1e-3, batch_size=2, out=student, progress=False)
    weights = read_checkpoint(student)["state_dict"]

    task = _KeepModelsTask()
    settings = ["cubist r=1 loc=1", f"cubist r=1 loc=1 checkpoint={student}"]
    result = run_sweep(task, tiny_vit, settings, runs=1, warmup=0, progress=False)
    distilled = task.models[settings[1]]
    assert all(torch.equal(weights[k], v) for k, v in distilled.state_dict().items())
    assert type(distilled).__name__ == "MergingVisionTransformer"
    assert not torch.equal(task.models[settings[0]].blocks[2].attn.qkv.weight, distilled.blocks[2].attn.qkv.weight)
    assert result.rows[2].options["checkpoint"] == str(student)

    with pytest.warns(UserWarning, match="distilled for 'cubist r=1 loc=1'"):
        run_sweep(_AgreementTask(), tiny_vit, [f"cubist r=2 loc=1 checkpoint={student}"], runs=1, progress=False)
    other = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5, pretrained=False).eval()
    with pytest.raises(SweepConfigError, match="written for"):
        run_sweep(_AgreementTask(), other, [f"cubist r=1 loc=1 checkpoint={student}"], runs=1, progress=False)
