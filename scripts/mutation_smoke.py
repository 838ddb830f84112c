#!/usr/bin/env python
"""Mutation smoke test: break the library on purpose, one known way at a time, and check that a test fails.

Every entry below is a deliberate bug (an exact search/replace on the current source) and the tests that
must catch it. Each mutation is applied to a scratch copy of the checkout (never to the checkout itself),
the listed tests run there with the copy first on ``PYTHONPATH``, and the mutation counts as caught when
they fail. A mutation whose search text no longer occurs exactly once is reported as stale: the code
moved, so the entry must be updated, not silently skipped.

    python scripts/mutation_smoke.py               # every mutation (tens of minutes on 2 cores)
    python scripts/mutation_smoke.py --list
    python scripts/mutation_smoke.py --only tome   # the mutations whose name contains "tome"

Not part of CI: it runs the same tests many times. Exit status 1 if any mutation survives or is stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cubistmerge.assets import ENV_VAR as ASSETS_ENV
from cubistmerge.assets import default_assets_dir

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that must fail


MUTATIONS: tuple[Mutation, ...] = (
    # ---- the five breakages issue 12 found passing the suite
    Mutation(
        "sam: reduced-window block drops the attention residual",
        "cubistmerge/patch/segment_anything.py",
        "    x = shortcut + y\n",
        "    x = y\n",
        ("tests/patch/test_sam_reference.py",),
    ),
    Mutation(
        "tinyvit: stretched bias reads one bilinear corner from the wrong row",
        "cubistmerge/patch/timm_tinyvit.py",
        "+ at(dy_hi, dx_lo) * fy * (1 - fx)",
        "+ at(dy_lo, dx_lo) * fy * (1 - fx)",
        ("tests/patch/test_timm_tinyvit_reference.py",),
    ),
    Mutation(
        "tome: matching on the residual stream instead of the attention keys",
        "cubistmerge/patch/_after_attention.py",
        "    metric = keys_metric(keys)\n",
        "    metric = x\n",
        ("tests/patch/test_after_attention_reference.py",),
    ),
    Mutation(
        "coco: mask logits thresholded at 0.5 instead of 0",
        "cubistmerge/eval/coco_sam.py",
        "masks = (prediction.masks > 0).cpu().numpy()",
        "masks = (prediction.masks > 0.5).cpu().numpy()",
        ("tests/eval/test_anchors.py",),
    ),
    Mutation(
        "expedite: initial centres by max pooling instead of average pooling",
        "cubistmerge/merge/expedite.py",
        "centres = F.adaptive_avg_pool2d(",
        "centres = F.adaptive_max_pool2d(",
        ("tests/merge/test_expedite_reference.py", "tests/patch/test_expedite_reference.py"),
    ),
    # ---- ToMe, PiToMe, ToFu
    Mutation(
        "tome: window tiles of SAM/TinyViT matched on the tokens, not the keys",
        "cubistmerge/patch/_sam_common.py",
        "return merge_apply_unmerge_in_windows(normed, tile, r, mlp, metric=metric)",
        "return merge_apply_unmerge_in_windows(normed, tile, r, mlp)",
        ("tests/patch/test_tome_windows_reference.py",),
    ),
    Mutation(
        "tome: kept A tokens not sorted when a class token is present",
        "cubistmerge/merge/tome.py",
        "kept_a = kept_a.sort(dim=1).values[:, (p + 1) // 2 :]",
        "kept_a = kept_a[:, : kept_a.shape[1] - (p + 1) // 2]",
        ("tests/merge/test_tome.py", "tests/patch/test_after_attention_reference.py"),
    ),
    Mutation(
        "tome: A/B alternation from the first patch token (the old spatial partition) by default",
        "cubistmerge/merge/tome.py",
        'start = 0 if order == "official" else p',
        "start = p",
        ("tests/merge/test_tome.py", "tests/patch/test_after_attention_reference.py"),
    ),
    Mutation(
        "tome: parse_r's first layer not rounded down",
        "cubistmerge/merge/tome.py",
        "first = int(base * (1.0 - inflection))",
        "first = base * (1.0 - inflection)",
        ("tests/merge/test_tome.py",),
    ),
    Mutation(
        "tome: proportional attention dropped",
        "cubistmerge/patch/state.py",
        "        if not proportional or self.size is None:",
        "        if True:",
        ("tests/patch/test_after_attention_reference.py",),
    ),
    Mutation(
        "tome: LayerScale of the attention branch dropped",
        "cubistmerge/patch/timm_vit.py",
        "x = x + block.drop_path1(block.ls1(attn_out))",
        "x = x + block.drop_path1(attn_out)",
        ("tests/patch/test_after_attention_reference.py",),
    ),
    Mutation(
        "pitome: every block uses the first block's margin",
        "cubistmerge/patch/_after_attention.py",
        "margin=options.margins[block],",
        "margin=options.margins[0],",
        ("tests/patch/test_after_attention_reference.py",),
    ),
    Mutation(
        "tofu: MLERP blocks prune instead",
        "cubistmerge/patch/_after_attention.py",
        "merge_tofu(x, match, options.modes[block], mlerp_norm=options.mlerp_norm)",
        'merge_tofu(x, match, "prune", mlerp_norm=options.mlerp_norm)',
        ("tests/patch/test_after_attention_reference.py", "tests/merge/test_tofu.py"),
    ),
    Mutation(
        "low precision: scores computed in the input dtype",
        "cubistmerge/merge/groups.py",
        "    return dtype if dtype == torch.float64 else _MIN_SCORE_DTYPE",
        "    return dtype",
        ("tests/merge/test_tome.py", "tests/merge/test_cubist.py", "tests/merge/test_pitome.py"),
    ),
    # ---- TinyViT (more in tests/patch/test_timm_tinyvit_reference.py's history: these are the sharpest)
    Mutation(
        "tinyvit: bias table not stretched (same-size offsets)",
        "cubistmerge/patch/timm_tinyvit.py",
        "distance = ((steps[:, None] - steps[None, :]).abs() * (w - 1)).to(table.dtype) / max(window - 1, 1)",
        "distance = (steps[:, None] - steps[None, :]).abs().to(table.dtype)",
        ("tests/patch/test_timm_tinyvit_reference.py",),
    ),
    Mutation(
        "tinyvit: local conv skipped on the reduced path",
        "cubistmerge/patch/timm_tinyvit.py",
        "y = block.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)",
        "y = x  # (B, H, W, C)",
        ("tests/patch/test_timm_tinyvit_reference.py",),
    ),
    Mutation(
        "tinyvit: grid not recovered before a downsampling stage",
        "cubistmerge/patch/timm_tinyvit.py",
        "if recover is not None and not _keeps_grid(stage):",
        "if False and recover is not None and not _keeps_grid(stage):",
        ("tests/patch/test_timm_tinyvit_reference.py",),
    ),
    Mutation(
        "windows: edge windows reduced by one token less",
        "cubistmerge/merge/windows.py",
        "return min(r, extent // 2)",
        "return min(r, (extent - 1) // 2)",
        ("tests/patch/test_timm_tinyvit_reference.py", "tests/merge/test_windows.py"),
    ),
    # ---- SAM-style encoders
    Mutation(
        "sam: window not reduced after the reduction (relative positions of the old size)",
        "cubistmerge/patch/_sam_common.py",
        "            window = wh\n",
        "            window = state.window\n",
        ("tests/patch/test_sam_reference.py",),
    ),
    Mutation(
        "sam: stages recovered in the wrong order",
        "cubistmerge/patch/_sam_common.py",
        "chained = recover if state.recover is None else state.recover.then(recover)",
        "chained = recover if state.recover is None else recover.then(state.recover)",
        ("tests/patch/test_sam_reference.py",),
    ),
    Mutation(
        "timm sam: LayerScale of the attention branch dropped in the reduced-window block",
        "cubistmerge/patch/timm_sam.py",
        "    x = block.drop_path1(block.ls1(block.attn(x)))",
        "    x = block.drop_path1(block.attn(x))",
        ("tests/patch/test_sam_reference.py",),
    ),
    # ---- RoPE ViTs (Eva)
    Mutation(
        "eva: reduced-grid RoPE centres half a cell off",
        "cubistmerge/patch/timm_eva.py",
        "rows = (torch.arange(Hm, device=device, dtype=torch.float32) + 0.5) * (H / Hm) - 0.5",
        "rows = torch.arange(Hm, device=device, dtype=torch.float32) * (H / Hm) - 0.5",
        ("tests/patch/test_timm_eva_reference.py",),
    ),
    Mutation(
        "eva: rope='tokens' placed on the regular grid",
        "cubistmerge/patch/timm_eva.py",
        'per_token = settings.rope == "tokens"',
        "per_token = False",
        ("tests/patch/test_timm_eva_reference.py",),
    ),
    Mutation(
        "eva: ToMe block without LayerScale gamma_1",
        "cubistmerge/patch/timm_eva.py",
        "attn_out = block.gamma_1 * attn_out",
        "attn_out = attn_out",
        ("tests/patch/test_timm_eva_reference.py",),
    ),
    Mutation(
        "eva: post-norm ToMe block without proportional attention",
        "cubistmerge/patch/timm_eva.py",
        "block.norm1(block.attn(x, **_block_kwargs(rope, bias, is_causal)))",
        "block.norm1(block.attn(x, **_block_kwargs(rope, None, is_causal)))",
        ("tests/patch/test_timm_eva_reference.py",),
    ),
    # ---- Expedite
    Mutation(
        "expedite: neighbourhood one cell wider",
        "cubistmerge/merge/expedite.py",
        "radius = neighbourhood // 2\n",
        "radius = neighbourhood // 2 + 1\n",
        ("tests/merge/test_expedite_reference.py",),
    ),
    Mutation(
        "expedite: reconstruction from k - 1 neighbours",
        "cubistmerge/merge/expedite.py",
        "top, index = logits.topk(min(k, logits.shape[-1]), dim=-1)",
        "top, index = logits.topk(max(1, min(k, logits.shape[-1]) - 1), dim=-1)",
        ("tests/merge/test_expedite_reference.py",),
    ),
    Mutation(
        "expedite: initial cells by exact floor instead of torch's nearest resizing",
        "cubistmerge/merge/expedite.py",
        '    return F.interpolate(labels, size=size, mode="nearest").reshape(size).long()',
        "    return torch.arange(size, device=device) * cells // size",
        ("tests/merge/test_expedite_reference.py",),
    ),
    # ---- CubistMerge's proportional attention
    Mutation(
        "cubist prop_attn: sizes restart at every stage instead of adding up",
        "cubistmerge/patch/timm_vit.py",
        "size = group_sizes(index, p + Hm * Wm, state.size)",
        "size = group_sizes(index, p + Hm * Wm, None)",
        ("tests/patch/test_cubist_prop_attn_reference.py",),
    ),
    Mutation(
        "cubist prop_attn: sizes tracked but never added to the attention",
        "cubistmerge/patch/timm_vit.py",
        "prop_attn = cubist and options.prop_attn",
        "prop_attn = False",
        ("tests/patch/test_cubist_prop_attn_reference.py",),
    ),
    # ---- distillation
    Mutation(
        "distill: accumulated losses not divided by the group size",
        "cubistmerge/train/distill.py",
        "loss = self.task.loss(student_out, teacher_out, labels, model=self.student, images=batch) / group_size",
        "loss = self.task.loss(student_out, teacher_out, labels, model=self.student, images=batch)",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: resume restarts the schedule",
        "cubistmerge/train/distill.py",
        '        self.scheduler.load_state_dict(state["scheduler"])',
        "        pass",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: every parameter trains by default",
        "cubistmerge/train/trainable.py",
        '    if trainable == "all":',
        "    if True:",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: timm's eval-mode attention-bias cache kept between training forwards",
        "cubistmerge/train/distill.py",
        "        clear_attention_bias_caches(self.student)\n        return self.task.outputs(self.student, images)",
        "        return self.task.outputs(self.student, images)",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: the returned student keeps biases cached before its last step",
        "cubistmerge/train/distill.py",
        "        clear_attention_bias_caches(self.student)  # the returned student",
        "        pass  # the returned student",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: load_student keeps the biases cached before loading",
        "cubistmerge/train/checkpoint.py",
        "    clear_attention_bias_caches(model)  # biases cached",
        "    pass  # biases cached",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: a parameter listed as trainable without a gradient goes unnoticed",
        "cubistmerge/train/distill.py",
        "        if missing:\n            shown",
        "        if False:\n            shown",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: gradient clipping skipped",
        "cubistmerge/train/distill.py",
        "            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.clip_grad)",
        "            pass",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: the teacher cache is written but never read",
        "cubistmerge/train/distill.py",
        "        cached = self.targets.get(files, flipped) if self.targets is not None else None",
        "        cached = None",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: resume accepts another learning rate",
        "cubistmerge/train/distill.py",
        "    trained = {k: v for k, v in asdict(config).items() if k not in OPERATIONAL_FIELDS}",
        "    trained = {k: v for k, v in asdict(config).items() if k not in (*OPERATIONAL_FIELDS, 'lr')}",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: the teacher cache keeps one target per image whatever side it is shown",
        "cubistmerge/train/distill.py",
        '        side = "|flipped" if flipped else ""',
        '        side = ""',
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "distill: the frozen prefix's output is kept per image whatever its flip",
        "cubistmerge/train/distill.py",
        "        keys = [(int(i), side) for i, side in zip(indices, flipped, strict=True)]",
        "        keys = [(int(i), False) for i in indices]",
        ("tests/train/test_prefix.py",),
    ),
    Mutation(
        "prefix: the skipped modules still run",
        "cubistmerge/train/prefix.py",
        "            module.forward = (lambda *_args, **_kwargs: outputs) "
        "if name == self.kept else self.placeholders[name]",
        "            pass",
        ("tests/train/test_prefix.py",),
    ),
    Mutation(
        "distill: the default learning rate is not the task's",
        "cubistmerge/train/distill.py",
        "        config = replace(config, lr=DEFAULT_LR[distill_task.name])",
        "        config = replace(config, lr=1e-6)",
        ("tests/train/test_distill.py",),
    ),
    Mutation(
        "stats: the bootstrap draws other images for the second model (unpaired)",
        "cubistmerge/eval/stats.py",
        "    resampled = (weights @ a - weights @ b) / (weights @ n)",
        "    resampled = (weights @ a - weights[::-1] @ b) / (weights @ n)",
        ("tests/eval/test_stats.py",),
    ),
    Mutation(
        "distill: labels never reach the loss",
        "cubistmerge/train/tasks.py",
        "            loss = loss + self.ce_weight * F.cross_entropy(student, labels)",
        "            pass",
        ("tests/train/test_distill.py",),
    ),
    # ---- resize baseline
    Mutation(
        "resize: output grid not brought back (left at the small size)",
        "cubistmerge/resize.py",
        'grid = F.interpolate(grid, size=self._full_grid(), mode="bilinear", align_corners=False)',
        'grid = F.interpolate(grid, scale_factor=1.0, mode="bilinear", align_corners=False)',
        ("tests/test_resize.py",),
    ),
)


def _copy_checkout(target: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis")
    shutil.copytree(ROOT, target, ignore=ignore, dirs_exist_ok=True)


def run(mutation: Mutation, scratch: Path, python: str) -> str:
    """'caught', 'SURVIVED' or 'STALE: ...' for one mutation."""
    source = (ROOT / mutation.path).read_text()
    count = source.count(mutation.old)
    if count != 1:
        return f"STALE: the search text occurs {count} times in {mutation.path}"
    target = scratch / mutation.path
    target.write_text(source.replace(mutation.old, mutation.new))
    try:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(scratch), os.environ.get("PYTHONPATH", "")]),
            # The scratch copy has no ../shared/assets beside it; without this the asset tests would skip.
            ASSETS_ENV: os.environ.get(ASSETS_ENV, str(default_assets_dir())),
        }
        done = subprocess.run(
            [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        target.write_text(source)
    if done.returncode == 1:
        return "caught"
    if done.returncode == 0:
        return "SURVIVED"
    return f"STALE: pytest exited with {done.returncode}: {done.stdout[-300:]}{done.stderr[-300:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}  [{mutation.path}] -> {', '.join(mutation.tests)}")
        return 0
    failures = 0
    with tempfile.TemporaryDirectory(prefix="cubistmerge-mutants-") as tmp:
        scratch = Path(tmp)
        _copy_checkout(scratch)
        for mutation in chosen:
            start = time.perf_counter()
            outcome = run(mutation, scratch, sys.executable)
            failures += outcome != "caught"
            print(f"{outcome:>8}  {mutation.name}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutations caught")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
