"""Distributed evaluation helpers: environment, sharding without padding, gathering, and a real ``torchrun``.

The end-to-end test runs the ImageNet evaluation of a tiny random ViT (and a ToMe-merged copy) on 7 images
(an odd count, so a padding sampler would count an image twice) once as a plain process and once under
``torchrun --nproc_per_node 2`` with gloo on the CPU, and requires the same records and metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cubistmerge.assets import assets_dir
from cubistmerge.eval import (
    DistEnv,
    ShardSampler,
    broadcast_from_main,
    dist_env,
    gather_objects,
    gather_records,
    init_distributed,
    resolve_device,
    shard,
    shard_indices,
)

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
NUM_IMAGES = 7


@pytest.fixture()
def clean_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --------------------------------------------------------------------------- environment


def test_single_process_environment(clean_env):
    env = dist_env()
    assert env == DistEnv(1, 0, 0) and env.is_main and not env.distributed
    assert init_distributed("cpu") == env
    assert not torch.distributed.is_initialized()


def test_environment_from_torchrun_variables(clean_env):
    clean_env.setenv("WORLD_SIZE", "3")
    clean_env.setenv("RANK", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    env = dist_env()
    assert env == DistEnv(3, 2, 1) and env.distributed and not env.is_main


@pytest.mark.parametrize(
    ("variables", "match"),
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE must be an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"0 <= RANK < WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE >= 1"),
        ({"WORLD_SIZE": "2"}, "RANK is not"),
    ],
)
def test_environment_errors(clean_env, variables, match):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        dist_env()


def test_resolve_device():
    two = DistEnv(2, 1, 1)
    assert resolve_device("cuda", two) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", two) == torch.device("cuda", 0)
    assert resolve_device("cpu", two) == torch.device("cpu")
    assert resolve_device("cuda", DistEnv()) == torch.device("cuda")


# --------------------------------------------------------------------------- sharding and gathering


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_items", [0, 1, 5, NUM_IMAGES, 8])
def test_shards_are_disjoint_covering_and_unpadded(world_size, num_items):
    shards = [list(shard_indices(num_items, DistEnv(world_size, rank, 0))) for rank in range(world_size)]
    flat = [i for part in shards for i in part]
    assert sorted(flat) == list(range(num_items))  # each item exactly once: no padding, no gap
    assert all(i % world_size == rank for rank, part in enumerate(shards) for i in part)
    items = [f"item{i}" for i in range(num_items)]
    for rank in range(world_size):
        env = DistEnv(world_size, rank, 0)
        assert shard(items, env) == [items[i] for i in shards[rank]]
        assert list(ShardSampler(num_items, env)) == shards[rank] and len(ShardSampler(num_items, env)) == len(
            shards[rank]
        )
    with pytest.raises(ValueError, match="num_items must be >= 0"):
        shard_indices(-1, DistEnv())


def test_gathering_in_a_world_of_one():
    records = [(3, "c"), (1, "a"), (2, "b")]
    assert gather_records(records, key=lambda r: r[0], env=DistEnv()) == [(1, "a"), (2, "b"), (3, "c")]
    assert records == [(3, "c"), (1, "a"), (2, "b")]  # the caller's list is left as it was
    assert gather_objects({"x": 1}, DistEnv()) == [{"x": 1}]
    assert broadcast_from_main("result", DistEnv()) == "result"
    # what a padding sampler (DistributedSampler) would produce: the last item twice
    with pytest.raises(ValueError, match="record key 2 was produced more than once"):
        gather_records([(0, "a"), (1, "b"), (2, "c"), (2, "c")], key=lambda r: r[0], env=DistEnv())


def test_collectives_need_a_process_group(clean_env):
    with pytest.raises(RuntimeError, match="no process group is initialised; call .*init_distributed"):
        gather_objects(1, DistEnv(2, 0, 0))
    with pytest.raises(RuntimeError, match="no process group"):
        broadcast_from_main(1, DistEnv(2, 1, 1))


# --------------------------------------------------------------------------- torchrun end to end

SCRIPT = textwrap.dedent(
    """
    import copy
    import json
    import sys
    from pathlib import Path

    import timm
    import torch

    import cubistmerge
    from cubistmerge.eval import dist_env, evaluate_imagenet, shard_indices

    out_dir, data, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)  # the same weights in every process
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4)
    merged = cubistmerge.patch(copy.deepcopy(base), "tome", r=3)
    result = evaluate_imagenet(
        {"none": base, "tome": merged}, data, reference="none", batch_size=2, max_images=count, progress=False
    )
    env = dist_env()
    payload = {
        "rank": env.rank,
        "world_size": env.world_size,
        "shard": list(shard_indices(count, env)),
        "result": result.to_dict(),
    }
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(payload))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    """
)


def _data_dir(tmp_path: Path) -> Path:
    """The real ImageNet subset when the shared assets exist, else 7 seeded noise images with labels."""
    try:
        real = assets_dir() / "imagenet-val-subset"
        if (real / "labels.txt").is_file():
            return real
    except FileNotFoundError:
        pass
    from PIL import Image

    folder = tmp_path / "noise"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    lines = []
    for k in range(NUM_IMAGES):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"noise{k}.png")
        lines.append(f"noise{k}.png, {100 * k}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _run(command: list[str], cwd: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a shared CPU: no thread oversubscription
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    if completed.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")


def _comparable(result: dict) -> dict:
    """The result without what legitimately differs between runs: timings and the process count."""
    out = json.loads(json.dumps(result))
    out.pop("seconds")
    out["settings"].pop("world_size")
    for model in out["models"]:
        model.pop("forward_ms_per_image")
    return out


def test_torchrun_two_processes_equal_one_process(tmp_path):
    data = _data_dir(tmp_path)
    script = tmp_path / "evaluate.py"
    script.write_text(SCRIPT, encoding="utf-8")
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()

    start = time.perf_counter()
    _run([sys.executable, str(script), str(single), str(data), str(NUM_IMAGES)], tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(multi),
            str(data),
            str(NUM_IMAGES),
        ],
        tmp_path,
    )
    elapsed = time.perf_counter() - start

    one = json.loads((single / "rank0.json").read_text())
    rank0 = json.loads((multi / "rank0.json").read_text())
    rank1 = json.loads((multi / "rank1.json").read_text())
    assert (one["world_size"], rank0["world_size"], rank1["world_size"]) == (1, 2, 2)
    assert (rank0["shard"], rank1["shard"]) == ([0, 2, 4, 6], [1, 3, 5])  # 7 images, none repeated
    assert rank0["result"]["settings"]["world_size"] == 2
    assert rank1["result"] == rank0["result"]  # every process returns rank 0's result
    result = rank0["result"]
    assert result["num_images"] == NUM_IMAGES and [s["index"] for s in result["samples"]] == list(range(NUM_IMAGES))
    assert _comparable(result) == _comparable(one["result"])
    assert elapsed < 120, f"the two runs took {elapsed:.0f} s"
