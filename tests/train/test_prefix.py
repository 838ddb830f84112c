"""The frozen prefix (cubistmerge.train.prefix): skipped only where that is exact, and training is unchanged by it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import PatchEmbed

import cubistmerge
from cubistmerge.train import distill
from cubistmerge.train.prefix import find_frozen_prefix
from tests.train.test_distill import FAMILIES, image_dir, tiny_vit  # noqa: F401 - image_dir is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_after(model: nn.Module, first: str) -> None:
    """Mark the parameters of block ``first`` and everything registered after it as trained."""
    names = [name for name, _ in model.named_parameters()]
    start = next(i for i, name in enumerate(names) if name.startswith(first + "."))
    for i, (_, parameter) in enumerate(model.named_parameters()):
        parameter.requires_grad_(i >= start)


def test_skipping_gives_the_full_output_without_running_the_prefix(monkeypatch):
    model = tiny_vit()
    cubistmerge.patch(model, "cubist", r=2, loc=2)
    _trained_after(model, "blocks.2")
    images = torch.rand(3, 3, 64, 64)
    prefix = find_frozen_prefix(model, lambda: model(images), max_bytes=2**20)
    assert not isinstance(prefix, str), prefix
    assert prefix.boundary == "blocks.2" and prefix.kept == "blocks.1"
    assert {"patch_embed", "blocks.0", "blocks.1"} <= set(prefix.skipped)
    assert not any(name in ("norm", "head") or name.startswith(("blocks.2", "blocks.3")) for name in prefix.skipped)
    with torch.no_grad():
        full = model(images)
        inputs = prefix.capture(lambda: model(images))
        calls = []
        original = PatchEmbed.forward
        monkeypatch.setattr(PatchEmbed, "forward", lambda self, x: calls.append(1) or original(self, x))
        with prefix.skipping(inputs):
            skipped = model(images)
        after = model(images)
    assert calls == [1]  # only the forward after the context computed the patch embedding
    torch.testing.assert_close(skipped, full, rtol=0, atol=0)
    torch.testing.assert_close(after, full, rtol=0, atol=0)
    assert "forward" not in model.patch_embed.__dict__  # the placeholder is gone


def test_the_store_keeps_items_until_it_is_full():
    model = tiny_vit()
    cubistmerge.patch(model, "cubist", r=2, loc=1)
    _trained_after(model, "blocks.1")
    images = torch.rand(2, 3, 64, 64)
    item_bytes = 65 * 32 * 4  # (1 + 8 x 8 tokens, 32 channels), float32
    prefix = find_frozen_prefix(model, lambda: model(images), max_bytes=3 * item_bytes)
    inputs = prefix.capture(lambda: model(images))
    prefix.put(["a", "b"], inputs)
    prefix.put(["c", "d"], inputs)
    assert list(prefix.store) == ["a", "b", "c"] and prefix.stored_bytes == 3 * item_bytes
    assert prefix.get(["a", "d"]) is None
    torch.testing.assert_close(prefix.get(["c", "a"]), torch.stack([inputs[0], inputs[0]]))


class _ReadsTheStemLater(nn.Module):
    """A stem whose output the head reads past the blocks: skipping the stem would change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        return self.blocks(stem) + stem


def test_a_prefix_read_past_the_boundary_is_not_skipped():
    model = _ReadsTheStemLater()
    _trained_after(model, "blocks.1")
    reason = find_frozen_prefix(model, lambda: model(torch.rand(2, 4)), max_bytes=2**20)
    assert isinstance(reason, str) and "differs from the full forward" in reason
    model = _ReadsTheStemLater()
    _trained_after(model, "stem")
    assert find_frozen_prefix(model, lambda: model(torch.rand(2, 4)), max_bytes=2**20) == (
        "no frozen module runs before the first trained block (stem)"
    )


@pytest.mark.parametrize("method", ["cubist", "tome"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_with_the_prefix_skipped_equals_training_without(image_dir, family, method):  # noqa: F811
    """Two epochs (the second runs on kept inputs, flipped ones included): the same trained weights."""
    build, cubist_setting, tome_setting = FAMILIES[family]
    model = build()
    setting = cubist_setting if method == "cubist" else tome_setting
    options = dict(epochs=2, lr=1e-3, batch_size=4, warmup=0.0, augment=True, progress=False)
    skipped = distill(copy.deepcopy(model), image_dir, setting, **options)
    full = distill(copy.deepcopy(model), image_dir, setting, prefix_cache_gb=0, **options)
    assert full.frozen_prefix == {"off": "prefix_cache_gb=0"}
    assert skipped.frozen_prefix.get("skipped"), skipped.frozen_prefix
    # every image in both flips it was drawn with
    assert skipped.frozen_prefix["kept_images"] > len(list(image_dir.iterdir()))
    assert skipped.fingerprint == full.fingerprint  # how a run is carried out is not part of its recipe
    trained = dict(skipped.student.named_parameters())
    for name, parameter in full.student.named_parameters():
        torch.testing.assert_close(trained[name], parameter, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(skipped.history, full.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
