"""The SAM distillation losses: the image's extent, the padded area left out, and the frozen mask decoder's
outputs for label-free prompts (cubistmerge.train.sam_prompts), on tiny SAMs built here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cubistmerge.train import distill
from cubistmerge.train.sam_prompts import (
    decode,
    decoder_loss,
    grid_points,
    mask_boxes,
    valid_embedding_mse,
    valid_extent,
)
from cubistmerge.train.tasks import make_task

from .test_distill import _tiny_minisam, image_dir  # noqa: F401 - the fixture is shared

pytestmark = pytest.mark.usefixtures("one_thread")


def _padded(height: int, width: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    image = torch.zeros(3, size, size)
    image[:, :height, :width] = torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))
    return image


def test_valid_extent_is_where_the_zero_padding_starts():
    images = torch.stack([_padded(256, 100), _padded(37, 256), _padded(256, 256)])
    assert valid_extent(images) == [(256, 100), (37, 256), (256, 256)]
    assert valid_extent(torch.zeros(1, 3, 8, 8)) == [(1, 1)]


def test_embedding_mse_leaves_the_padded_cells_out():
    images = torch.stack([_padded(256, 100)])  # 16 x 16 cells of 16 px: the image covers 7 columns (100 / 16)
    teacher = torch.randn(1, 8, 16, 16)
    student = teacher.clone()
    student[..., 7:] += 5.0  # only padded cells differ
    assert float(valid_embedding_mse(student, teacher, images)) == 0.0
    student[..., 6] += 1.0  # a cell the image reaches
    assert float(valid_embedding_mse(student, teacher, images)) == pytest.approx(1 / 7)  # one of 7 columns, by 1


def test_grid_points_are_cell_centres_inside_the_image():
    points = grid_points(100, 200, 2)
    assert points.tolist() == [[50.0, 25.0], [150.0, 25.0], [50.0, 75.0], [150.0, 75.0]]


def test_mask_boxes_bound_the_positive_logits():
    logits = -torch.ones(2, 1, 8, 8)
    logits[0, 0, 2:5, 3:7] = 1.0
    boxes, found = mask_boxes(logits, 4.0)
    assert found.tolist() == [True, False]
    assert boxes[0].tolist() == [12.0, 8.0, 28.0, 20.0]  # x0, y0, x1, y1 at 4x


def test_decoder_loss_is_zero_for_equal_embeddings_and_reaches_the_student():
    sam = _tiny_minisam()
    images = torch.stack([_padded(256, 160), _padded(200, 256, seed=1)])
    with torch.no_grad():
        teacher = sam.image_encoder(images)
    with torch.no_grad():
        assert float(decoder_loss(sam, teacher.clone(), teacher, images, side=2)) == 0.0
    student = (teacher + 0.1 * torch.randn_like(teacher)).requires_grad_(True)
    loss = decoder_loss(sam, student, teacher, images, side=2)
    loss.backward()
    assert float(loss.detach()) > 0 and student.grad.abs().sum() > 0
    # by hand for the first image's point prompts: the mask MSE over the image's 160 / 4 = 40 columns + IoU MSE
    points = grid_points(256, 160, 2)
    with torch.no_grad():
        s_logits, s_iou = decode(sam, student[:1], points=points)
        t_logits, t_iou = decode(sam, teacher[:1], points=points)
    expected = F.mse_loss(s_logits[..., :40], t_logits[..., :40]) + F.mse_loss(s_iou, t_iou)
    assert s_logits.shape[-1] == 64 and float(expected) > 0
    with torch.no_grad():
        one = decoder_loss(sam, student[:1], teacher[:1], images[:1], side=2)
    # the loss averages the point term and (when the teacher finds masks) the box term
    t_boxes, found = mask_boxes(t_logits, 256 / 64)
    if bool(found.any()):
        with torch.no_grad():
            sb, si = decode(sam, student[:1], boxes=t_boxes[found])
            tb, ti = decode(sam, teacher[:1], boxes=t_boxes[found])
        expected = (expected + F.mse_loss(sb[..., :40], tb[..., :40]) + F.mse_loss(si, ti)) / 2
    assert float(one) == pytest.approx(float(expected), rel=1e-5)


def test_distill_with_the_decoder_loss_trains_the_encoder_only(image_dir):  # noqa: F811
    import cubistmerge
    from cubistmerge.train.data import ImageFolder

    sam = _tiny_minisam()
    common = dict(epochs=1, lr=1e-3, batch_size=4, warmup=0.0, shuffle=False, progress=False)
    plain = distill(sam, image_dir, "cubist r=2 loc=1", **common)
    with_decoder = distill(sam, image_dir, "cubist r=2 loc=1", decoder_weight=1.0, **common)
    inside = distill(sam, image_dir, "cubist r=2 loc=1", exclude_padding=True, **common)
    assert with_decoder.task["decoder_weight"] == 1.0 and inside.task["exclude_padding"] is True
    assert with_decoder.history[0]["loss"] > plain.history[0]["loss"]
    # the first step's loss is the untrained student's, computed by hand
    task = make_task(sam)
    dataset = ImageFolder(image_dir, task.transform(sam))
    images = torch.stack([dataset[i][0] for i in range(4)])
    student = cubistmerge.patch(_tiny_minisam().image_encoder, "cubist", r=2, loc=1)
    with torch.no_grad():
        s, t = student(images), sam.image_encoder(images)
        assert valid_extent(images)[0] != (256, 256)  # the test images are not square: there is padding
        assert inside.history[0]["loss"] == pytest.approx(float(valid_embedding_mse(s, t, images)), rel=1e-5)
        expected = F.mse_loss(s, t) + decoder_loss(sam, s, t, images, side=4)
    assert with_decoder.history[0]["loss"] == pytest.approx(float(expected), rel=1e-4)
    assert all(name.startswith("image_encoder.") for name in with_decoder.trainable)
    before = dict(sam.named_parameters())
    after = dict(with_decoder.student.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith("image_encoder."))
    assert len({plain.fingerprint, with_decoder.fingerprint, inside.fingerprint}) == 3


def test_sam_loss_options_are_checked():
    from tests.train.test_distill import tiny_vit

    with pytest.raises(ValueError, match="SAM losses"):
        make_task(tiny_vit(), decoder_weight=1.0)
    with pytest.raises(ValueError, match="prompt_grid"):
        make_task(_tiny_minisam(), decoder_weight=1.0, prompt_grid=0)
    task = make_task(_tiny_minisam(), exclude_padding=True)
    with pytest.raises(ValueError, match="input images"):
        task.loss(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 4))
