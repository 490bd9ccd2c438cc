"""modelopt_lite.eval: Spearman correlation and the fidelity report."""

import math

import numpy as np
import pytest
import torch

from modelopt_lite.eval import FidelityReport, fidelity_report, spearman


def test_spearman_perfect_monotone_is_one():
    # any strictly increasing transform keeps every rank: rho = 1 exactly
    assert spearman([1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]) == 1.0
    # nonlinear but monotone (x**3) still gives identical ranks
    assert spearman([0.1, -2.0, 3.0, 0.5], [0.001, -8.0, 27.0, 0.125]) == 1.0


def test_spearman_reversed_is_minus_one():
    # exactly reversed ranks: rho = -1
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == -1.0


def test_spearman_ties_use_average_ranks():
    # a = [1, 2, 2, 3] -> ranks [0, 1.5, 1.5, 3]; b ranks [0, 1, 2, 3];
    # centred: [-1.5, 0, 0, 1.5] . [-1.5, -.5, .5, 1.5] = 4.5; norms^2 4.5 and 5 -> 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    # ties in both: a ranks [0.5, 0.5, 2, 3], b ranks [0, 1.5, 1.5, 3];
    # centred a [-1, -1, .5, 1.5], b [-1.5, 0, 0, 1.5]: dot 1.5 + 2.25 = 3.75; |a|^2 = 4.5, |b|^2 = 4.5 -> 3.75 / 4.5
    assert spearman([7, 7, 8, 9], [1, 5, 5, 6]) == pytest.approx(3.75 / 4.5, abs=1e-12)


def test_spearman_matches_pearson_of_average_ranks_on_random_data():
    # Spearman is Pearson correlation of (average) ranks; compare with numpy on data with many ties
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=50).astype(float)
    b = a + rng.integers(0, 3, size=50)

    def avg_ranks(x):
        return np.array([(x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])

    expected = np.corrcoef(avg_ranks(a), avg_ranks(b))[0, 1]
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)


def test_spearman_constant_input_is_zero():
    # a constant sequence has no ranking information: the code defines rho = 0 (no division by zero)
    assert spearman([3, 3, 3], [1, 2, 3]) == 0.0


@pytest.mark.parametrize("a,b", [([1, 2, 3], [1, 2]), ([1], [1])])
def test_spearman_rejects_bad_lengths(a, b):
    # different lengths, or fewer than two values, have no correlation
    with pytest.raises(ValueError, match="same length >= 2"):
        spearman(a, b)


def _unit_rows(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_fidelity_report_identical_embeddings():
    emb = _unit_rows()
    r = fidelity_report(emb, emb.clone())
    assert isinstance(r, FidelityReport)
    # 12 sentences in, 12 reported
    assert r.sentences == 12
    # cosine of a unit vector with itself is 1 (up to float32 rounding of the norm)
    assert r.mean_cosine == pytest.approx(1.0, abs=1e-6)
    assert r.min_cosine == pytest.approx(1.0, abs=1e-6)
    # identical pairwise similarities have identical ranks: rho = 1 exactly
    assert r.spearman_pairwise == 1.0
    assert r.as_dict() == {
        "sentences": 12, "mean_cosine": r.mean_cosine, "min_cosine": r.min_cosine, "spearman_pairwise": 1.0,
    }
    # the printed report names the three numbers
    text = str(r)
    assert "12 held-out sentences" in text and "mean cosine" in text and "Spearman" in text


def test_fidelity_report_negated_embeddings():
    emb = _unit_rows(seed=1)
    r = fidelity_report(emb, -emb)
    # cos(x, -x) = -1 for every row
    assert r.mean_cosine == pytest.approx(-1.0, abs=1e-6)
    # (-a).(-b) = a.b: pairwise similarities are unchanged, so their ranking is identical
    assert r.spearman_pairwise == pytest.approx(1.0, abs=1e-12)
