"""The ``cubistmerge`` command line: help, the bench command's outputs, and argument errors."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

import pytest

from cubistmerge.bench import Variant
from cubistmerge.cli import (
    _bench_variants,
    bench_command_line,
    build_parser,
    main,
    parse_cubist_r,
    parse_cubist_stages,
    parse_tome_r,
    variant_to_args,
)

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "2"]


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


def test_top_level_help(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "bench" in out and "usage: cubistmerge" in out


def test_bench_help_describes_every_option(capsys):
    assert run_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--method",
        "--cubist-r",
        "--cubist-loc",
        "--cubist-stages",
        "--representation",
        "--metric",
        "--tome-r",
        "--no-prop-attn",
        "--batch-size",
        "--img-size",
        "--device",
        "--dtype",
        "--runs",
        "--warmup",
        "--threads",
        "--profile-runs",
        "--json",
        "--markdown",
        "--checkpoint",
        "--pretrained",
        "--no-progress",
    ):
        assert flag in out, flag
    assert "examples:" in out and "deit_small_patch16_224" in out


def test_python_dash_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "cubistmerge", "bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--cubist-r" in done.stdout


def test_bench_writes_json_and_markdown(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    md_path = tmp_path / "bench.md"
    argv = [
        "bench",
        *TINY,
        "--method",
        "cubist",
        "tome",
        "--method",
        "none",
        "--cubist-r",
        "1,1",
        "--tome-r",
        "2",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--threads",
        "2",
        "--profile-runs",
        "2",
        "--no-progress",
        "--json",
        str(json_path),
        "--markdown",
        str(md_path),
    ]
    assert run_main(argv) == 0
    captured = capsys.readouterr()
    assert "baseline" in captured.out and "cubist r=(1,1) loc=1" in captured.out
    assert captured.err == ""  # --no-progress: no status lines, no profiler noise

    data = json.loads(json_path.read_text())
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
    assert data["model"] == "vit_tiny_patch16_224"
    assert (data["batch_size"], data["img_size"], data["runs"], data["threads"]) == (2, 64, 2, 2)
    assert data["weights"] == "random"
    assert data["command"] == shlex.join(["cubistmerge", *argv])
    assert [row["method"] for row in data["rows"]] == ["none", "cubist", "tome", "none"]
    assert data["rows"][1]["options"] == {"r": [1, 1], "loc": 1}
    assert data["rows"][2]["options"] == {"r": 2}
    for row in data["rows"]:
        for key in ("images_per_s", "speedup", "flops_per_image", "flop_ratio", "efficiency", "merge_fraction"):
            assert key in row, key
    assert data["rows"][3]["flop_ratio"] == 1.0
    assert data["profile_runs"] == 2

    markdown = md_path.read_text()
    assert markdown.count("\n| ") == 1 + len(data["rows"])  # header + rows (the rule starts with "|-")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--cubist-r", "abc"], "argument --cubist-r"),
        (["bench", "--cubist-r", "-1"], ">= 0"),
        (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["bench", "--tome-r", "eight"], "argument --tome-r"),
        (["bench", "--tome-r", "8,2"], "inflection in [-1, 1]"),
        (["bench", "--tome-r", "[8,x]"], "argument --tome-r"),
        (["bench", "--cubist-stages", "1-1-1"], "loc:r_h:r_w"),
        (["bench", "--method", "dct"], "invalid choice: 'dct'"),
        (["bench", "--batch-size", "0"], "positive integer"),
        (["bench", "--runs", "many"], "argument --runs"),
        (["bench", "--device", "tpu"], "argument --device"),
        (["bench", "--json", "/nonexistent-dir/out.json"], "does not exist"),
        (["bench", "--checkpoint", "/nonexistent-dir/w.pth"], "no such file"),
        (["bench", "--method", "tome", "--cubist-loc", "2"], "--cubist-loc applies only to --method cubist"),
        (["bench", "--cubist-stages", "1:1:1", "--cubist-r", "2"], "either, not both"),
        (["bench", "--model", "no_such_model_xyz", "--no-progress"], "unknown timm model"),
        (["bench", *TINY, "--method", "cubist", "--cubist-r", "9", "--no-progress"], "on a 4x4 grid"),
        ([], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_message(argv, message, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert message in err
    assert "Traceback" not in err


def test_checkpoint_and_pretrained_are_exclusive(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert run_main(["bench", "--checkpoint", str(weights), "--pretrained"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_value_parsers():
    assert parse_cubist_r("2") == 2
    assert parse_cubist_r("1,2") == (1, 2)
    assert parse_cubist_r("0.1") == 0.1
    assert parse_cubist_r("0.1,0.2") == (0.1, 0.2)
    assert parse_cubist_stages("1:1:1,6:2:1") == [(1, 1, 1), (6, 2, 1)]
    assert parse_cubist_stages("3:0.1") == [(3, 0.1)]
    assert parse_tome_r("8") == 8
    assert parse_tome_r("8,-0.5") == (8, -0.5)
    assert parse_tome_r("[8, 8, 4]") == [8, 8, 4]
    for parser, text in ((parse_cubist_r, "1,2,3"), (parse_cubist_r, ""), (parse_tome_r, "[8,-1]")):
        with pytest.raises(argparse.ArgumentTypeError):
            parser(text)


def test_default_variants():
    parser, commands = build_parser()
    args = parser.parse_args(["bench"])
    assert args.model == "deit_small_patch16_224"
    assert (args.batch_size, args.runs, args.device, args.dtype) == (8, 10, "cpu", "float32")
    assert _bench_variants(args, commands["bench"]) == [
        Variant("cubist", {"r": 1, "loc": 1}),
        Variant("tome", {"r": 8}),
    ]


@pytest.mark.parametrize(
    "variant",
    [
        Variant("none"),
        Variant("cubist", {"r": (2, 2), "loc": 1}),
        Variant("cubist", {"r": 0.1, "loc": 3, "representation": "mean", "metric": "l2"}),
        Variant("cubist", {"stages": [(1, 1, 1), (6, 1, 2)]}),
        Variant("tome", {"r": 8}),
        Variant("tome", {"r": (8, -0.5), "prop_attn": False}),
        Variant("tome", {"r": [8, 8, 4]}),
    ],
)
def test_variant_to_args_round_trip(variant):
    parser, commands = build_parser()
    args = parser.parse_args(["bench", *variant_to_args(variant)])
    assert _bench_variants(args, commands["bench"]) == [variant]


def test_bench_command_line():
    line = bench_command_line(
        "deit_base_patch16_224", Variant("cubist", {"r": (1, 1), "loc": 1}), batch_size=16, runs=15, pretrained=False
    )
    assert line == (
        "cubistmerge bench --model deit_base_patch16_224 --method cubist --cubist-r 1,1 --cubist-loc 1 "
        "--batch-size 16 --runs 15"
    )
