"""``cubistmerge distill``: the CLI gives the Python API's student and clear error exits."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cubistmerge.bench import build_model
from cubistmerge.cli import main
from cubistmerge.train import load_student, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for k in range(4):
        pixels = torch.randint(0, 256, (30, 40, 3), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{k}.jpg")
    return folder.parent


def test_distill_imagenet_writes_a_student_that_loads_back(images, tmp_path, capsys):
    out, history = tmp_path / "student.pt", tmp_path / "history.json"
    common = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--images", str(images)]
    status = main(
        ["distill", "imagenet", *common, "--setting", "tome r=2", "--epochs", "1", "--batch-size", "2",
         "--lr", "1e-3", "--out", str(out), "--json", str(history), "--no-progress"]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "distilled 'tome r=2'" in printed and str(out) in printed
    record = json.loads(history.read_text())
    assert record["setting"] == "tome r=2" and len(record["history"]) == 2 and record["images_seen"] == 4
    payload = read_checkpoint(out)
    assert payload["task"]["task"] == "classifier" and payload["config"]["lr"] == 1e-3

    # The CLI's model is build_model's (seed 0): loading the checkpoint into a fresh one gives the student.
    student = load_student(build_model("vit_tiny_patch16_224", img_size=32), out)
    teacher = build_model("vit_tiny_patch16_224", img_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(student(x), teacher(x))
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in student.state_dict().items())


def test_distill_errors_exit_with_a_message(images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["distill", "imagenet", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--no-progress"]
    assert main([*base, "--images", str(empty), "--setting", "cubist r=1"]) == 2
    assert "no image" in capsys.readouterr().err
    assert main([*base, "--images", str(images), "--setting", "cubist r=5 loc=1"]) == 2  # a 2 x 2 grid
    assert "cannot run on this model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--images", str(images)])  # no --setting
    assert "--setting" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "imagenet", "--model", "no_such_model", "--setting", "tome r=2", "--images", str(images)])
    assert "unknown timm model" in capsys.readouterr().err
