"""Evaluations of (patched) models with real weights on real labelled images (need the ``eval`` extra)."""

from .coco_sam import (
    COCO_TINY_IMAGE_IDS,
    MIN_AREA,
    EncoderSpeedResult,
    InstanceResult,
    SamCocoResult,
    eligible_annotations,
    evaluate_sam_coco,
    load_coco,
    mask_iou,
    prepared_coco_images,
    resolve_image_path,
    sam_encoder_speed,
    select_image_ids,
    xywh_to_xyxy,
)

__all__ = [
    "COCO_TINY_IMAGE_IDS",
    "MIN_AREA",
    "EncoderSpeedResult",
    "InstanceResult",
    "SamCocoResult",
    "eligible_annotations",
    "evaluate_sam_coco",
    "load_coco",
    "mask_iou",
    "prepared_coco_images",
    "resolve_image_path",
    "sam_encoder_speed",
    "select_image_ids",
    "xywh_to_xyxy",
]
