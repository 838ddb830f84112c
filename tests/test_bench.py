"""The benchmark API: result fields and the consistency of the derived ratios (never the speed itself)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from cubistmerge._runtime import foreign_cpu_load
from cubistmerge.bench import (
    BenchConfigError,
    BenchResult,
    RunStats,
    Variant,
    _union_length,
    benchmark,
    build_model,
    cpu_name,
)

MODEL = "vit_tiny_patch16_224"
SETTINGS = dict(batch_size=2, img_size=64, runs=2, warmup=1, progress=False)


@pytest.fixture(scope="module")
def result() -> BenchResult:
    variants = [
        Variant("cubist", {"r": 1, "loc": 1}),
        ("tome", {"r": 2}),
        "none",
    ]
    return benchmark(MODEL, variants, command="pytest bench", **SETTINGS)


def test_rows_and_labels(result):
    assert [row.label for row in result.rows] == ["baseline", "cubist r=1 loc=1", "tome r=2", "none"]
    assert [row.method for row in result.rows] == ["none", "cubist", "tome", "none"]
    assert result.baseline is result.rows[0]
    assert result.variants == result.rows[1:]
    assert result.rows[1].options == {"r": 1, "loc": 1}


def test_setup_fields(result):
    assert result.model == MODEL
    assert result.weights == "random"
    assert result.device == "cpu"
    assert result.device_name
    assert result.dtype == "float32"
    assert (result.batch_size, result.img_size, result.runs, result.warmup) == (2, 64, 2, 1)
    assert result.threads == torch.get_num_threads()
    assert result.torch_version == torch.__version__
    assert result.timm_version == timm.__version__
    assert result.command == "pytest bench"
    assert result.foreign_cpu_load is None or result.foreign_cpu_load >= 0.0


def test_run_statistics(result):
    for row in result.rows:
        stats = row.images_per_s
        assert len(stats.samples) == 2
        assert all(v > 0 for v in stats.samples)
        assert stats.min <= stats.p25 <= stats.median <= stats.p75 <= stats.max
        assert len(row.paired_speedup.samples) == 2


def test_speedup_is_ratio_of_medians(result):
    base = result.baseline.images_per_s.median
    for row in result.rows:
        assert row.speedup == pytest.approx(row.images_per_s.median / base)
    assert result.baseline.speedup == 1.0
    for row in result.rows:
        paired = [v / b for v, b in zip(row.images_per_s.samples, result.baseline.images_per_s.samples, strict=True)]
        assert row.paired_speedup.samples == pytest.approx(paired)


def test_flop_ratio_and_efficiency(result):
    base = result.baseline.flops_per_image
    assert base > 0
    for row in result.rows:
        assert row.flop_ratio == pytest.approx(base / row.flops_per_image)
        assert row.efficiency == pytest.approx(row.speedup / row.flop_ratio)
    by_label = {row.label: row for row in result.rows}
    assert by_label["baseline"].flop_ratio == 1.0
    assert by_label["none"].flop_ratio == 1.0
    assert by_label["none"].flops_per_image == base
    assert by_label["cubist r=1 loc=1"].flop_ratio > 1.0
    assert by_label["tome r=2"].flop_ratio > 1.0


def test_tokens_per_block(result):
    by_label = {row.label: row.tokens_per_block for row in result.rows}
    assert by_label["baseline"] == [17] * 12
    assert by_label["none"] == [17] * 12
    assert by_label["cubist r=1 loc=1"] == [17] + [10] * 11  # 4x4 grid -> 3x3 at block 1
    tome = by_label["tome r=2"]
    assert tome[0] == 17 and all(a >= b for a, b in zip(tome, tome[1:], strict=False)) and tome[-1] < 17


def test_merge_fraction(result):
    for row in result.rows:
        assert 0.0 <= row.merge_fraction <= 1.0
        assert row.profiled_forward_ms > 0
    by_label = {row.label: row for row in result.rows}
    assert by_label["baseline"].merge_fraction == 0.0
    assert by_label["none"].merge_fraction == 0.0
    # the patch's "cubistmerge::" scopes were found in the profile
    assert by_label["cubist r=1 loc=1"].merge_fraction > 0.0
    assert by_label["tome r=2"].merge_fraction > 0.0
    assert by_label["tome r=2"].merge_ms > 0.0


def test_to_json(result):
    data = json.loads(result.to_json())
    for key in (
        "model",
        "weights",
        "device",
        "device_name",
        "dtype",
        "batch_size",
        "img_size",
        "runs",
        "warmup",
        "threads",
        "torch_version",
        "timm_version",
        "command",
        "rows",
    ):
        assert key in data, key
    assert len(data["rows"]) == 4
    row = data["rows"][1]
    for key in (
        "label",
        "method",
        "options",
        "images_per_s",
        "speedup",
        "flops_per_image",
        "flop_ratio",
        "efficiency",
        "merge_fraction",
        "tokens_per_block",
    ):
        assert key in row, key
    assert set(row["images_per_s"]) >= {"median", "min", "max", "p25", "p75", "iqr", "samples"}
    tome = data["rows"][2]
    assert tome["options"] == {"r": 2}


def test_to_markdown_and_text(result):
    markdown = result.to_markdown()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(result.rows)  # header, rule, one row per model copy
    assert "| cubist r=1 loc=1 |" in markdown
    assert result.device_name in markdown and "pytest bench" in markdown
    text = result.to_text()
    assert "tome r=2" in text and "speed-up" in text


def test_run_stats_of():
    stats = RunStats.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats.min, stats.p25, stats.median, stats.p75, stats.max) == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert stats.iqr == 2.0
    with pytest.raises(ValueError):
        RunStats.of([])


def test_union_length_counts_nested_scopes_once():
    assert _union_length([]) == 0.0
    assert _union_length([(0, 10), (2, 5), (12, 14)]) == 12
    assert _union_length([(5, 8), (0, 6)]) == 8


def testforeign_cpu_load():
    # 10 s wall, the machine was busy 15 CPU-s of which this process used 12 -> 0.3 CPUs elsewhere
    assert foreign_cpu_load((0.0, 100.0, 5.0), (10.0, 115.0, 17.0)) == pytest.approx(0.3)
    assert foreign_cpu_load((0.0, 100.0, 5.0), (10.0, 110.0, 17.0)) == 0.0  # clock granularity
    assert foreign_cpu_load(None, (1.0, 1.0, 1.0)) is None


def test_variant_coercion_and_names():
    assert Variant.coerce("tome") == Variant("tome")
    assert Variant.coerce(("cubist", {"r": (2, 2)})).name == "cubist r=(2,2)"
    assert Variant("cubist", {"r": 0.1, "loc": 2}).name == "cubist r=0.1 loc=2"
    assert Variant("tome", {"r": [8, 4]}, label="mine").name == "mine"
    with pytest.raises(BenchConfigError):
        Variant("dct")
    with pytest.raises(BenchConfigError):
        Variant("none", {"r": 1})


@pytest.mark.parametrize(
    "model, variants, kwargs, message",
    [
        ("vit_tiny_patch16_22", ["none"], {}, "did you mean"),
        (MODEL, [("cubist", {"r": 9})], {}, "cubist r=9"),
        (MODEL, [("tome", {"bogus": 1})], {}, "bogus"),
        (MODEL, ["none"], {"dtype": "int8"}, "dtype"),
        (MODEL, ["none"], {"runs": 0}, "runs"),
        (MODEL, ["none"], {"checkpoint": "/nonexistent/weights.pth"}, "not found"),
    ],
)
def test_config_errors(model, variants, kwargs, message):
    settings = {**SETTINGS, **kwargs}
    with pytest.raises(BenchConfigError, match=message):
        benchmark(model, variants, **settings)


def test_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model(MODEL, pretrained=False, img_size=64)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = build_model(MODEL, img_size=64, checkpoint=path)
    assert not loaded.training
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    result = benchmark(MODEL, ["none"], checkpoint=path, **{**SETTINGS, "runs": 1, "warmup": 0})
    assert result.weights == str(path)


def test_cpu_name():
    assert isinstance(cpu_name(), str) and cpu_name()
