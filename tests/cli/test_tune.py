"""``cubistmerge tune`` and ``--setting-file``: the CLI writes a setting file every command reads back."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cubistmerge.cli import build_parser, main
from cubistmerge.cli._options import setting_text
from cubistmerge.sweep import parse_setting

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4):
        pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{k}.png")
    return folder


def test_tune_writes_a_setting_file_that_bench_and_sweeps_read(images, tmp_path, capsys):
    setting, record = tmp_path / "setting.json", tmp_path / "tune.json"
    model = ["--model", "vit_tiny_patch16_224", "--img-size", "64"]
    status = main(
        ["tune", "imagenet", *model, "--images", str(images), "--target", "1.01", "--setting", "cubist r=1 loc=1",
         "--setting", "tome r=4", "--calibration-images", "2", "--first-rung", "2", "--runs", "2", "--warmup", "0",
         "--batch-size", "2", "--out", str(setting), "--json", str(record), "--no-progress"]
    )  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    chosen = json.loads(setting.read_text())
    assert chosen["method"] in ("cubist", "tome") and f"setting: {json.dumps(chosen)}" in out
    assert json.loads(record.read_text())["target_speedup"] == 1.01

    args = build_parser()[0].parse_args(["sweep", "dense", "--setting-file", str(setting), "--setting", "tome r=2"])
    assert parse_setting(args.setting[0]).options == {k: v for k, v in chosen.items() if k != "method"}
    assert main(["bench", *model, "--setting-file", str(setting), "--runs", "1", "--warmup", "0",
                 "--batch-size", "2", "--no-progress"]) == 0  # fmt: skip
    assert f"{chosen['method']} " in capsys.readouterr().out


def test_setting_text_round_trips_through_parse_setting():
    options = {"r": (1, 2), "loc": 3, "metric": "l2", "stages": [(1, 1, 1), (6, 1, 1)], "prop_attn": False}
    assert parse_setting(setting_text("cubist", options)).options == options
    assert parse_setting(setting_text("tome", {"r": [0, 0, 49]})).options == {"r": [0, 0, 49]}


def test_tune_errors(images, tmp_path, capsys):
    base = ["tune", "imagenet", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--no-progress"]
    assert main([*base, "--images", str(images), "--target", "0.9"]) == 2
    assert "target_speedup must be > 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "dense", "--setting-file", str(tmp_path / "missing.json")])
    assert "no such setting file" in capsys.readouterr().err
