"""Self-distillation of merged models (cubistmerge.train.distill) on tiny random-weight models.

The real runs (MobileSAM, ImgFocus on the shared images) are benchmarks, not tests; here every path runs on
models of a few thousand parameters and 8 tiny images so the file stays fast on 2 cores.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import cubistmerge
from cubistmerge.sweep import parse_setting
from cubistmerge.train import CheckpointError, DistillConfigError, distill, load_student, read_checkpoint
from cubistmerge.train.distill import lr_factor
from cubistmerge.train.tasks import make_task
from cubistmerge.train.trainable import select_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_IMAGES = 8


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """8 x 8 patch grid, 4 blocks, 10 classes, LayerScale so every block's gammas matter."""
    torch.manual_seed(seed)
    settings = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10, init_values=0.5)
    settings.update(overrides)
    model = VisionTransformer(**settings).eval()
    # Random (not zero) biases and head, so the logits depend on every block.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.2)
        # Logits of about unit spread: neither near-uniform nor saturated, so the KL responds to the merge.
        model.head.weight.normal_(0, 0.3)
        model.pos_embed.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for k in range(NUM_IMAGES):
        # Blobs plus noise: neighbouring tokens similar as in photographs, but not identical.
        base = torch.rand(3, 6, 8, generator=generator)
        pixels = torch.nn.functional.interpolate(base[None], size=(48, 60), mode="bilinear")[0]
        pixels = (0.7 * pixels + 0.3 * torch.rand(3, 48, 60, generator=generator)).clamp(0, 1)
        array = (pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"img{k}.png")
    return folder


def _batch(image_dir: Path, model) -> torch.Tensor:
    from cubistmerge.train.data import ImageFolder

    task = make_task(model)
    dataset = ImageFolder(image_dir, task.transform(model))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _loss(student, teacher, images) -> float:
    task = make_task(teacher)
    with torch.no_grad():
        return float(task.loss(task.outputs(student, images), task.outputs(teacher, images)))


# --------------------------------------------------------------------------- schedule and selection


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    total, warm = 10, 2
    factors = [lr_factor(step, total, warm, 0.1) for step in range(total)]
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3])
    assert factors[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert lr_factor(total, total, warm, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("setting", "first_trained_block"),
    [("cubist r=1 loc=2", 2), ("cubist r=2 loc=3", 3), ("tome r=4", 0), ("expedite r=2 loc=1", 1)],
)
def test_default_trains_the_blocks_from_the_first_reduction_on(image_dir, setting, first_trained_block):
    model = tiny_vit()
    variant = parse_setting(setting)
    student = cubistmerge.patch(copy.deepcopy(model), variant.method, **variant.options)
    images = _batch(image_dir, model)[:2]
    task = make_task(model)
    names = select_trainable(student, model, lambda m: task.outputs(m, images))
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})
    assert blocks == list(range(first_trained_block, 4))
    # The embedding, position table and class token run before any reduction; the final norm and head after.
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token")) for n in names)
    assert {"norm.weight", "head.weight", "head.bias"} <= set(names)
    # Every tensor of a trained block trains, not only those whose own inputs changed.
    assert f"blocks.{first_trained_block}.norm1.weight" in names


def test_norms_biases_and_all(image_dir):
    model = tiny_vit()
    student = cubistmerge.patch(copy.deepcopy(model), "cubist", r=1, loc=2)
    images = _batch(image_dir, model)[:2]
    task = make_task(model)
    run = lambda m: task.outputs(m, images)  # noqa: E731
    subset = select_trainable(student, model, run, "norms_biases")
    assert subset and all(n.endswith("bias") or ".norm" in n or n.startswith("norm.") for n in subset)
    assert "blocks.2.attn.qkv.bias" in subset and "blocks.2.attn.qkv.weight" not in subset
    assert "blocks.1.norm1.weight" not in subset
    assert select_trainable(student, model, run, "all") == [n for n, _ in student.named_parameters()]
    with pytest.raises(ValueError, match="trainable must be one of"):
        select_trainable(student, model, run, "heads")


# --------------------------------------------------------------------------- training


def test_a_few_steps_reduce_the_student_teacher_loss(image_dir):
    model = tiny_vit()
    images = _batch(image_dir, model)
    before = cubistmerge.patch(copy.deepcopy(model), "cubist", r=2, loc=1)
    result = distill(model, image_dir, "cubist r=2 loc=1", epochs=6, lr=1e-5, batch_size=4, warmup=0.0, progress=False)
    start, end = _loss(before, model, images), _loss(result.student, model, images)
    with torch.no_grad():
        # Merging moves the logits well beyond float32 noise, so the reduction below means something.
        assert (before(images) - model(images)).abs().max() > 1e-3
    assert end < 0.5 * start, (start, end)
    assert len(result.history) == 12 and result.images_seen == 6 * NUM_IMAGES
    # The model given is neither trained nor patched.
    assert type(model) is VisionTransformer
    assert torch.equal(model.blocks[3].mlp.fc1.weight, tiny_vit().blocks[3].mlp.fc1.weight)


@pytest.mark.parametrize("setting", ["cubist r=2 loc=2", "cubist r=2 loc=2 representation=mean", "tome r=6"])
def test_gradients_flow_through_the_merge_to_the_blocks_before_it(image_dir, setting):
    """With every parameter trainable, the blocks before the reduction get gradients only through the merged
    values: a merge that detached its output (or a matching that broke the graph) leaves them at zero."""
    model = tiny_vit()
    variant = parse_setting(setting)
    student = cubistmerge.patch(copy.deepcopy(model), variant.method, **variant.options)
    images = _batch(image_dir, model)[:4]
    task = make_task(model)
    with torch.no_grad():
        target = task.outputs(model, images)
    task.loss(task.outputs(student, images), target).backward()
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight", "pos_embed"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


def test_dense_and_sam_tasks_run(image_dir, tmp_path):
    """One step on an ImgFocus-layout model (the saliency logits) and on a tiny SAM (the image embeddings)."""
    from cubistmerge.models.img_focus import ImgFocus, SaliencyHead

    torch.manual_seed(0)
    backbone = VisionTransformer(
        img_size=224, patch_size=14, embed_dim=32, depth=3, num_heads=2, num_classes=0, init_values=0.5
    )
    focus = ImgFocus(backbone, SaliencyHead(in_chans=32, channels=(8, 8, 4))).eval()
    # A BatchNorm head (0-dim counters among its buffers) with the teacher cache.
    result = distill(focus, image_dir, "cubist r=2 loc=1", epochs=0.25, batch_size=2, progress=False, cache=tmp_path)
    assert result.task["task"] == "dense" and len(result.history) == 1 and result.history[0]["loss"] > 0
    assert any(n.startswith("head.") for n in result.trainable)
    assert not any(n.startswith("backbone.blocks.0.") for n in result.trainable)

    from tests.patch.test_sam import _tiny_sam

    sam = _tiny_sam()
    result = distill(sam, image_dir, "cubist r=1 loc=1", epochs=0.25, batch_size=2, progress=False)
    assert result.task["task"] == "sam" and result.history[0]["loss"] > 0
    assert all(n.startswith("image_encoder.") for n in result.trainable)  # the decoder never sees a change


def test_accumulation_equals_a_larger_batch(image_dir):
    """Two accumulated batches of 2 make the same step as one batch of 4 (the loss is divided by the group)."""
    model = tiny_vit()
    one = distill(
        model,
        image_dir,
        "cubist r=1 loc=1",
        epochs=1,
        lr=1e-3,
        batch_size=4,
        shuffle=False,
        progress=False,
        clip_grad=None,
    )
    two = distill(
        model,
        image_dir,
        "cubist r=1 loc=1",
        epochs=1,
        lr=1e-3,
        batch_size=2,
        accumulate=2,
        shuffle=False,
        progress=False,
        clip_grad=None,
    )
    assert len(one.history) == len(two.history) == 2
    for (name, a), b in zip(one.student.state_dict().items(), two.student.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_into_an_unpatched_model_and_reproduces_the_student(image_dir, tmp_path):
    model = tiny_vit()
    out = tmp_path / "student.pt"
    result = distill(
        model, image_dir, "cubist r=1 loc=2 metric=l2", epochs=1, lr=1e-3, batch_size=4, out=out, progress=False
    )
    assert result.checkpoint == out
    payload = read_checkpoint(out)
    assert payload["setting"] == "cubist r=1 loc=2 metric=l2"
    assert set(payload["state_dict"]) == set(tiny_vit().state_dict())  # the original model's keys

    # By hand, as the checkpoint's docstring promises ...
    fresh = tiny_vit(seed=1)
    fresh.load_state_dict(payload["state_dict"])
    cubistmerge.patch(fresh, "cubist", r=1, loc=2, metric="l2")
    # ... and through load_student.
    loaded = load_student(tiny_vit(seed=2), out)
    images = _batch(image_dir, model)
    with torch.no_grad():
        expected = result.student(images)
        assert torch.equal(fresh(images), expected)
        assert torch.equal(loaded(images), expected)
        assert not torch.equal(model(images), expected)


def test_resume_continues_the_schedule_and_the_data(image_dir, tmp_path):
    model = tiny_vit()
    common = dict(epochs=3, lr=1e-3, batch_size=2, accumulate=2, warmup=0.2, progress=False)
    straight = distill(model, image_dir, "cubist r=1 loc=1", **common)
    part = tmp_path / "part.pt"
    first = distill(model, image_dir, "cubist r=1 loc=1", out=part, max_steps=3, **common)
    assert len(first.history) == 3 and read_checkpoint(part)["batches"] == 6
    resumed = distill(model, image_dir, "cubist r=1 loc=1", resume=part, **common)
    assert [h["step"] for h in resumed.history] == list(range(6))
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in straight.history])
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_teacher_cache_is_written_once_and_read_after(image_dir, tmp_path):
    model = tiny_vit()
    cache = tmp_path / "cache"
    plain = distill(model, image_dir, "tome r=4", epochs=2, lr=1e-3, batch_size=4, progress=False, shuffle=False)
    cached = distill(
        model, image_dir, "tome r=4", epochs=2, lr=1e-3, batch_size=4, progress=False, shuffle=False, cache=cache
    )
    files = list(cache.rglob("*.pt"))
    assert len(files) == NUM_IMAGES
    # float16 targets: the losses agree to float16 precision of the logits.
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in plain.history], rel=2e-2, abs=1e-5)
    again = distill(
        model, image_dir, "tome r=4", epochs=1, lr=1e-3, batch_size=4, progress=False, shuffle=False, cache=cache
    )
    assert len(list(cache.rglob("*.pt"))) == NUM_IMAGES and again.history


# --------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(image_dir, tmp_path):
    model = tiny_vit()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image"):
        distill(model, empty, "cubist r=1 loc=1", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="no readable image"):
        distill(model, broken, "cubist r=1 loc=1", progress=False)
    with pytest.raises(ValueError, match="cannot run on this model"):
        distill(model, image_dir, "cubist r=8 loc=1", progress=False)  # more than the 8 x 8 grid
    with pytest.raises((ValueError, TypeError), match="cannot run on this model"):
        distill(model, image_dir, "cubist r=1 loc=1 colour=red", progress=False)
    with pytest.raises(DistillConfigError, match="merging method"):
        distill(model, image_dir, "resize size=32", progress=False)
    with pytest.raises(DistillConfigError, match="CUDA|float16"):
        distill(model, image_dir, "cubist r=1 loc=1", dtype="float16", progress=False)
    with pytest.raises(DistillConfigError, match="augment"):
        distill(model, image_dir, "cubist r=1 loc=1", augment=True, cache=tmp_path / "c", progress=False)
    with pytest.raises(DistillConfigError, match="unmerged model"):
        distill(cubistmerge.patch(tiny_vit(), "cubist", r=1), image_dir, "cubist r=1 loc=1", progress=False)
    with pytest.raises(TypeError, match="cannot tell how to distil"):
        distill(torch.nn.Linear(3, 3), image_dir, "cubist r=1", progress=False)


def test_a_checkpoint_of_another_model_is_refused(image_dir, tmp_path):
    out = tmp_path / "student.pt"
    distill(tiny_vit(), image_dir, "cubist r=1 loc=1", epochs=0.5, batch_size=4, out=out, progress=False)
    with pytest.raises(CheckpointError, match="written for"):
        load_student(tiny_vit(embed_dim=48), out)
    with pytest.raises(CheckpointError, match="written for"):
        distill(tiny_vit(depth=3), image_dir, "cubist r=1 loc=1", resume=out, progress=False)
    with pytest.raises(DistillConfigError, match="setting"):
        distill(tiny_vit(), image_dir, "cubist r=2 loc=1", epochs=0.5, batch_size=4, resume=out, progress=False)
    plain = tmp_path / "plain.pt"
    torch.save(tiny_vit().state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a cubistmerge distillation checkpoint"):
        load_student(tiny_vit(), plain)


# --------------------------------------------------------------------------- torchrun

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from tests.train.test_distill import tiny_vit
    from cubistmerge.train import distill

    out, images, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result = distill(tiny_vit(), images, "cubist r=1 loc=1", epochs=2, lr=1e-3, batch_size=batch, shuffle=False,
                     progress=False, out=out)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        json.dump([h["loss"] for h in result.history], open(out + ".json", "w"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    """
)


def test_two_torchrun_processes_equal_one_process_with_the_same_global_batch(image_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    commands = [
        [sys.executable, str(script), one, str(image_dir), "4"],
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            two,
            str(image_dir),
            "2",
        ],
    ]
    for command in commands:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    losses_one, losses_two = json.loads(Path(one + ".json").read_text()), json.loads(Path(two + ".json").read_text())
    assert len(losses_one) == len(losses_two) == 4
    # Each loss is a KL of nearly equal distributions: a small difference of O(1) float32 terms, summed per rank
    # and then averaged, so its last few digits depend on the order of summation (measured: 3e-5 relative).
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    a, b = read_checkpoint(one), read_checkpoint(two)
    assert b["world_size"] == 2 and b["images_seen"] == a["images_seen"] == 2 * NUM_IMAGES
    for name, value in a["state_dict"].items():
        # float32 sums in another order (gloo's all-reduce of two halves): equal to rounding.
        assert torch.allclose(value, b["state_dict"][name], atol=1e-6, rtol=1e-5), name
