"""``cubistmerge bench`` on Hugging Face transformers models (--hf-config, --hf-model) and timm's Hiera (SAM2).

Tiny random-weight configs written as JSON: the table must hold the baseline and every variant with its speed-up
and FLOP ratio (never the speed itself). --hf-model runs offline here (HF_HUB_OFFLINE=1): a clear error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from cubistmerge.cli import main  # noqa: E402
from cubistmerge.models.hf import (  # noqa: E402
    HfModelError,
    build_hf_model,
    hf_config_dict,
    hf_timed_module,
    parse_hf_option,
)

COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
DINOV2 = {"model_type": "dinov2", "mlp_ratio": 2, **COMMON}
VIT = {"model_type": "vit", "intermediate_size": 64, **COMMON}
SAM = {
    "model_type": "sam",
    "vision_config": {
        **COMMON,
        "image_size": 64,
        "mlp_dim": 64,
        "window_size": 4,
        "global_attn_indexes": [1],
        "output_channels": 16,
        "num_pos_feats": 8,
    },
}
FAST = ["--batch-size", "2", "--runs", "2", "--warmup", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


def write_config(tmp_path, fields: dict, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(fields))
    return str(path)


def bench_json(tmp_path, capsys, argv: list[str]) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert run_main(["bench", *argv, *FAST, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def check_table(data: dict, text: str, labels: list[str]) -> None:
    """The baseline and every variant, each with a positive speed-up and FLOP ratio; merging cuts the FLOPs."""
    assert [row["label"] for row in data["rows"]] == labels
    assert "speed-up" in text and "FLOP ratio" in text
    for label in labels:
        assert label in text
    for row in data["rows"]:
        assert row["speedup"] > 0 and row["flops_per_image"] > 0 and row["flop_ratio"] > 0
    assert data["rows"][0]["flop_ratio"] == 1.0
    for row in data["rows"][1:]:
        assert row["flop_ratio"] > 1.0, row["label"]


def test_hf_config_file_dinov2(tmp_path, capsys):
    path = write_config(tmp_path, DINOV2)
    data, text = bench_json(tmp_path, capsys, ["--hf-config", path, "--method", "cubist", "tome", "--tome-r", "2"])
    check_table(data, text, ["baseline", "cubist r=1 loc=1", "tome r=2"])
    assert data["model"] == f"Dinov2Model (config {path})"
    assert data["weights"] == "random" and data["img_size"] == 32
    assert data["transformers_version"]
    assert data["rows"][0]["tokens_per_block"] == [17, 17]  # CLS + 4x4 patches
    assert data["rows"][1]["tokens_per_block"] == [17, 10]  # r=1 at block 1: a 3x3 grid


def test_hf_config_vit_at_another_size_interpolates(tmp_path, capsys):
    # A directory holding config.json; 48 px on a 32 px config: ViT needs interpolate_pos_encoding=True.
    write_config(tmp_path, VIT)
    data, text = bench_json(tmp_path, capsys, ["--hf-config", str(tmp_path), "--img-size", "48", "--method", "cubist"])
    check_table(data, text, ["baseline", "cubist r=1 loc=1"])
    assert data["img_size"] == 48
    assert data["rows"][0]["tokens_per_block"] == [37, 37]  # CLS + 6x6 patches


def test_hf_config_sam_times_the_vision_encoder(tmp_path, capsys):
    # SAM does not interpolate: built from a config, its encoder is built for --img-size.
    path = write_config(tmp_path, SAM, "sam.json")
    argv = ["--hf-config", path, "--img-size", "48", "--method", "cubist", "--cubist-r", "1", "--batch-size", "1"]
    data, text = bench_json(tmp_path, capsys, argv)
    check_table(data, text, ["baseline", "cubist r=1 loc=1"])
    assert data["model"] == f"SamModel.vision_encoder (config {path})"
    assert data["rows"][0]["tokens_per_block"] == [36, 36]  # a 6x6 grid, no prefix token
    first, second = data["rows"][1]["tokens_per_block"]
    assert first == 36 and second < 36  # merged inside the 4x4 windows (the patch's default window design)


def test_hf_config_model_type_with_options(tmp_path, capsys):
    options = [f"{key}={value}" for key, value in {**COMMON, "mlp_ratio": 2}.items()]
    argv = ["--hf-config", "dinov2", *[a for o in options for a in ("--hf-option", o)], "--method", "none"]
    data, text = bench_json(tmp_path, capsys, argv)
    assert [row["label"] for row in data["rows"]] == ["baseline", "none"]
    assert data["img_size"] == 32 and data["rows"][0]["tokens_per_block"] == [17, 17]


def test_hf_model_without_the_hub_is_a_clear_error(capsys, monkeypatch):
    # huggingface_hub read HF_HUB_OFFLINE when transformers was imported (above): set its flag, fail at once
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert run_main(["bench", "--hf-model", "facebook/dinov2-small", *FAST]) == 2
    err = capsys.readouterr().err
    assert "cannot load the Hugging Face model 'facebook/dinov2-small'" in err
    assert "--hf-config" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hf-option", "hidden_size=32"], "--hf-option applies only to --hf-model or --hf-config"),
        (["--hf-config", "dinov2", "--pretrained"], "--pretrained applies only to timm models"),
        (["--model", "vit_tiny_patch16_224", "--hf-config", "dinov2"], "not allowed with argument --model"),
        (["--hf-config", "dinov2", "--hf-option", "hiden_size=32"], "no field 'hiden_size'; did you mean hidden_size"),
        (["--hf-config", "dinov2", "--hf-option", "=3"], "KEY=VALUE"),
        (["--hf-config", "/nonexistent-dir/config.json"], "no such config file"),
        (["--hf-config", "no_such_type"], "no config file, directory, JSON object or transformers model type"),
        (["--hf-config", '{"hidden_size": 32}'], "needs a known 'model_type'"),
    ],
)
def test_hf_argument_errors(argv, message, capsys):
    assert run_main(["bench", *argv, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_hiera_sam2_through_the_timm_path(tmp_path, capsys):
    argv = ["--model", "sam2_hiera_tiny", "--img-size", "128", "--batch-size", "1"]
    data, text = bench_json(tmp_path, capsys, [*argv, "--method", "cubist", "--cubist-r", "2", "--cubist-loc", "2"])
    check_table(data, text, ["baseline", "cubist r=2 loc=2"])
    assert data["img_size"] == 128  # HieraDet takes any size: no img_size argument to timm
    # block 1 opens stage 2 by q-pooling: refused, with the blocks that can reduce
    assert run_main(["bench", *argv, *FAST, "--method", "cubist", "--cubist-r", "2", "--cubist-loc", "1"]) == 2
    err = capsys.readouterr().err
    assert "block 1 cannot reduce" in err and "q-pooling" in err and "Blocks that can: 0, 2" in err


# --------------------------------------------------------------------------- the Python API


def test_parse_hf_option():
    assert parse_hf_option("hidden_size=768") == ("hidden_size", 768)
    assert parse_hf_option("vision_config.global_attn_indexes=[2,5]") == ("vision_config.global_attn_indexes", [2, 5])
    assert parse_hf_option("hidden_act=gelu") == ("hidden_act", "gelu")
    with pytest.raises(HfModelError, match="KEY=VALUE"):
        parse_hf_option("hidden_size")


def test_build_hf_model_sub_config_option_and_sam_size():
    model = build_hf_model(config=SAM, options={"vision_config.num_hidden_layers": 1}, img_size=48)
    encoder = hf_timed_module(model)
    assert type(model).__name__ == "SamModel" and type(encoder).__name__ == "SamVisionEncoder"
    assert len(encoder.layers) == 1 and encoder.config.image_size == 48
    # transformers draws SAM's weights at std 1e-10; they are redrawn at a trained-like scale
    assert 0.01 < float(encoder.layers[0].attn.qkv.weight.detach().std()) < 0.05
    assert hf_config_dict('{"model_type": "vit"}') == {"model_type": "vit"}


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(HfModelError, match=r"pip install 'cubistmerge\[hf\]'"):
        build_hf_model(config=DINOV2)


def test_cli_import_does_not_import_transformers():
    code = "import sys, cubistmerge.cli, cubistmerge.bench; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
