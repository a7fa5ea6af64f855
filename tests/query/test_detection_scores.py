"""Detection helpers of :mod:`dvl_ooc.query` (``roc_auc``, ``rank_average``,
``detection_score``, ``mislabel_score``, ``detection_rates``) against independent
brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from dvl_ooc.exceptions import InputError
from dvl_ooc.query import (
    detection_rates,
    detection_score,
    mislabel_score,
    rank_average,
    roc_auc,
)


def _auc_pairs(known: np.ndarray, score: np.ndarray) -> float:
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    s = np.where(np.isnan(score), -np.inf, score)
    pos, neg = s[known], s[~known]
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def _ranks01(v: np.ndarray) -> np.ndarray:
    """Fractional ranks by counting: (#smaller + (#equal - 1) / 2) / (n_finite - 1)."""
    ok = np.isfinite(v)
    f = v[ok]
    out = np.zeros(len(v))
    for i in np.flatnonzero(ok):
        out[i] = ((f < v[i]).sum() + ((f == v[i]).sum() - 1) / 2) / (len(f) - 1)
    return out


def test_roc_auc_matches_pairwise_count_with_ties_and_nan():
    rng = np.random.default_rng(0)
    known = rng.random(60) < 0.2
    score = np.round(rng.normal(size=60) + 1.5 * known, 1)  # rounded: many ties
    score[[3, 17]] = np.nan
    assert roc_auc(known, score) == pytest.approx(_auc_pairs(known, score), abs=1e-12)
    assert roc_auc(known, -score) != pytest.approx(roc_auc(known, score))
    from sklearn.metrics import roc_auc_score

    ok = ~np.isnan(score)
    assert roc_auc(known[ok], score[ok]) == pytest.approx(roc_auc_score(known[ok], score[ok]))
    assert roc_auc(known, np.where(known, 1.0, 0.0)) == 1.0
    assert np.isnan(roc_auc(np.zeros(5, bool), np.arange(5.0)))
    with pytest.raises(InputError, match="length"):
        roc_auc(known[:5], score)


def test_rank_average_matches_counted_ranks():
    rng = np.random.default_rng(1)
    a = np.round(rng.normal(size=40), 1)
    b = rng.exponential(size=40) * 1e6  # another scale: only ranks count
    b[5] = np.nan
    ref_b = _ranks01(b)
    assert ref_b[5] == 0.0
    np.testing.assert_allclose(rank_average(a, b), (_ranks01(a) + ref_b) / 2, atol=1e-12)
    np.testing.assert_allclose(rank_average(a, b, weights=[3, 1]),
                               (3 * _ranks01(a) + ref_b) / 4, atol=1e-12)
    np.testing.assert_allclose(rank_average(a), _ranks01(a), atol=1e-12)
    with pytest.raises(InputError):
        rank_average(a, b[:10])
    with pytest.raises(InputError):
        rank_average(a, b, weights=[1, -1])


def test_detection_score_formulas():
    q = np.array([-2.0, 0.5, -0.1, 3.0, 1.0])
    s = np.array([4.0, 0.25, 0.0, 9.0, -1.0])
    rel = detection_score(q, s, "relative")
    np.testing.assert_allclose(rel[[0, 1, 3]], [-1.0, 1.0, 1.0])
    assert np.isnan(rel[2]) and np.isnan(rel[4])  # no positive self-influence: undefined
    np.testing.assert_allclose(detection_score(q, s, "rank"),
                               (_ranks01(s) + _ranks01(-q)) / 2, atol=1e-12)
    with pytest.raises(InputError, match="how"):
        detection_score(q, s, "bogus")


def test_detection_rates_counts_known_in_prefixes():
    known = np.zeros(20, bool)
    known[[0, 1, 7, 19]] = True
    order = np.arange(20)  # most suspicious first
    r = detection_rates(order, known)
    assert r["10%"] == {"flagged": 2, "found": 2, "recall": 0.5}
    assert r["20%"]["found"] == 2 and r["15%"]["flagged"] == 3


def test_mislabel_score_is_the_mean_checkpoint_loss_or_the_final_score():
    rng = np.random.default_rng(2)
    L = rng.exponential(size=(4, 30))  # per-point losses at 4 checkpoints
    L[1, 7] = np.nan  # a checkpoint that did not score point 7: left out of its mean
    ref = np.array([sum(L[k, r] for k in range(4) if not np.isnan(L[k, r]))
                    / sum(not np.isnan(L[k, r]) for k in range(4)) for r in range(30)])
    np.testing.assert_allclose(mislabel_score(L), ref, rtol=1e-14)
    np.testing.assert_allclose(mislabel_score(list(L)), ref, rtol=1e-14)  # a list of arrays
    assert mislabel_score(L[:, :5].astype(np.float32)).dtype == np.float64
    # the checkpoints decide; final-model scores are ignored then
    np.testing.assert_allclose(mislabel_score(L, loss=-ref, self_influence=-ref), ref)
    # without checkpoints: the final loss, else the final self-influence
    loss, si = rng.normal(size=30), rng.normal(size=30)
    np.testing.assert_array_equal(mislabel_score(loss=loss, self_influence=si), loss)
    np.testing.assert_array_equal(mislabel_score(self_influence=si), si)
    np.testing.assert_array_equal(mislabel_score(L[2]), L[2])  # one checkpoint
    with pytest.raises(InputError, match="checkpoint_losses"):
        mislabel_score()
    with pytest.raises(InputError, match="checkpoint_losses"):
        mislabel_score([])
