"""Label-free fidelity measures: perfect for identical outputs, the expected value for known perturbations."""

from __future__ import annotations

import math

import pytest
import torch

from cubistmerge.tuning import embedding_fidelity, fidelity, logit_fidelity, map_fidelity


def test_identical_outputs_are_perfect():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    assert logit_fidelity(logits, logits) == {"kl": 0.0, "top1_agreement": 1.0, "score": -0.0}
    embeddings = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    same = embedding_fidelity(embeddings, embeddings)
    assert same["cosine"] == pytest.approx(1.0) and same["relative_error"] == 0.0
    maps = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    assert map_fidelity(maps, maps)["correlation"] == pytest.approx(1.0) and map_fidelity(maps, maps)["mae"] == 0.0


def test_known_perturbations_give_their_values():
    # Two classes, logits (0, 0) against (log 3, 0): KL(p || q) with p = (3/4, 1/4), q = (1/2, 1/2).
    reference = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    merged = torch.zeros(1, 2, dtype=torch.float64)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    result = logit_fidelity(merged, reference)
    assert result["kl"] == pytest.approx(expected, rel=1e-12) and result["score"] == pytest.approx(-expected)
    assert result["top1_agreement"] == 1.0  # a tie (0, 0) goes to class 0, the reference's class
    # A constant shift of the logits changes no probability.
    assert logit_fidelity(reference + 5.0, reference)["kl"] == pytest.approx(0.0, abs=1e-12)

    embeddings = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(3))
    scaled = embedding_fidelity(1.1 * embeddings, embeddings)
    assert scaled["relative_error"] == pytest.approx(0.1) and scaled["cosine"] == pytest.approx(1.0)
    assert embedding_fidelity(-embeddings, embeddings)["cosine"] == pytest.approx(-1.0)

    maps = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(4))
    assert map_fidelity(2 * maps + 1, maps)["correlation"] == pytest.approx(1.0)
    assert map_fidelity(1 - maps, maps)["correlation"] == pytest.approx(-1.0)
    assert map_fidelity(maps + 0.25, maps)["mae"] == pytest.approx(0.25)


def test_argmax_agreement_counts_images():
    reference = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    merged = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert logit_fidelity(merged, reference)["top1_agreement"] == 0.75


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        map_fidelity(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kind must be one of"):
        fidelity("depth", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="B >= 1"):
        logit_fidelity(torch.zeros(0, 3), torch.zeros(0, 3))
