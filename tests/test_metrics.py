"""Tests of embseg.metrics: hand-computed cases, StarDist agreement, properties, scale."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embseg.metrics import (
    Matching,
    ap_table,
    default_thresholds,
    matching,
    matching_dataset,
    pool,
)

FIELDS = [f for f in Matching.__dataclass_fields__]


def square(shape, top_left, size, value=1, out=None):
    out = np.zeros(shape, np.int32) if out is None else out
    out[tuple(slice(t, t + size) for t in top_left)] = value
    return out


def random_labels(rng, shape, n, max_size):
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        lo = [rng.integers(0, s) for s in shape]
        size = [rng.integers(1, max_size) for _ in shape]
        labels[tuple(slice(a, a + b) for a, b in zip(lo, size, strict=True))] = i
    return labels


# ---------------------------------------------------------------------------- hand-computed


def test_empty_ground_truth():
    pred = square((10, 10), (2, 2), 3)
    m = matching(np.zeros((10, 10), np.uint8), pred)
    assert (m.tp, m.fp, m.fn, m.n_true, m.n_pred) == (0, 1, 0, 0, 1)
    assert m.precision == m.recall == m.accuracy == m.f1 == 0.0
    assert m.mean_true_score == m.mean_matched_score == m.panoptic_quality == 0.0


def test_empty_prediction():
    truth = square((10, 10), (2, 2), 3, out=square((10, 10), (6, 6), 2, value=4))
    m = matching(truth, np.zeros_like(truth))
    assert (m.tp, m.fp, m.fn, m.n_true, m.n_pred) == (0, 0, 2, 2, 0)
    assert m.accuracy == m.recall == 0.0


def test_both_empty_scores_zero_as_stardist():
    m = matching(np.zeros((5, 5), int), np.zeros((5, 5), int))
    assert (m.tp, m.fp, m.fn) == (0, 0, 0)
    assert m.precision == m.recall == m.accuracy == m.f1 == m.panoptic_quality == 0.0


def test_shifted_square_values():
    truth = square((20, 20), (5, 5), 10)
    pred = np.roll(truth, 2, axis=0)  # overlap 80, union 120
    low, high = matching(truth, pred, [0.6, 0.7])
    assert low.tp == 1 and low.fp == 0 and low.fn == 0
    assert low.mean_matched_score == pytest.approx(80 / 120)
    assert low.mean_true_score == pytest.approx(80 / 120)
    assert low.panoptic_quality == pytest.approx(80 / 120)
    assert (high.tp, high.fp, high.fn, high.accuracy) == (0, 1, 1, 0.0)


def test_iou_exactly_at_threshold_counts():
    truth = square((10, 10), (0, 0), 4)  # 16 px
    pred = np.zeros_like(truth)
    pred[0:4, 0:3] = 2  # 12 px inside: IoU 12/16 = 0.75
    m = matching(truth, pred, [0.75, 0.7500001])
    assert m[0].tp == 1 and m[1].tp == 0
    pred_half = np.zeros_like(truth)
    pred_half[0:2, 0:4] = 1  # IoU 8/16 = 0.5 exactly
    assert matching(truth, pred_half, 0.5).tp == 1


def test_one_to_many_is_one_to_one():
    truth = square((10, 10), (0, 0), 4)  # one object of 16 px
    pred = np.zeros_like(truth)
    pred[0:4, 0:2] = 1  # two halves, IoU 0.5 each
    pred[0:4, 2:4] = 2
    m = matching(truth, pred, [0.3, 0.5, 0.6])
    assert [x.tp for x in m] == [1, 1, 0]
    assert [x.fp for x in m] == [1, 1, 2]
    assert m[0].mean_matched_score == pytest.approx(0.5)
    # and the other way round: two true halves, one predicted object
    m = matching(pred, truth, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)


def test_assignment_is_optimal_not_greedy():
    # A best overlaps P1, but A must take P2 for B to get P1 (two TPs at 0.3)
    truth = np.zeros((1, 20), np.int32)
    truth[0, 0:10] = 1  # A
    truth[0, 10:14] = 2  # B
    pred = np.zeros_like(truth)
    pred[0, 0:4] = 5  # P2: IoU with A 0.4
    pred[0, 4:14] = 7  # P1: IoU with A 6/14 = 0.43, with B 4/10 = 0.4
    m = matching(truth, pred, 0.35)
    assert m.tp == 2
    assert m.mean_matched_score == pytest.approx((0.4 + 0.4) / 2)


def test_non_sequential_ids_and_dtypes():
    truth = square((12, 12), (1, 1), 4, value=1)
    square((12, 12), (6, 6), 5, value=2, out=truth)
    pred = np.roll(truth, 1, axis=1)
    reference = matching(truth, pred, default_thresholds(2))
    mapping = {1: 200, 2: 7}
    for dtype in (np.uint8, np.int32, np.uint64, np.int64, np.uint16):
        t = np.vectorize(lambda v: mapping.get(v, 0))(truth).astype(dtype)
        p = np.where(pred == 1, 3, np.where(pred == 2, 250, 0)).astype(dtype)
        assert matching(t, p, default_thresholds(2)) == reference


def test_huge_ids_use_sort_path():
    truth = np.zeros((8, 8), np.uint64)
    truth[0:3, 0:3] = 2**63 + 11
    truth[4:7, 4:7] = 5
    pred = np.zeros_like(truth)
    pred[0:3, 0:2] = 2**40
    m = matching(truth, pred, [0.5, 0.7])
    assert [(x.tp, x.fp, x.fn, x.n_true) for x in m] == [(1, 0, 1, 2), (0, 1, 2, 2)]


def test_bool_masks_are_one_object():
    truth = np.zeros((6, 6), bool)
    truth[1:4, 1:4] = True
    assert matching(truth, truth).tp == 1


def test_bad_inputs():
    a = np.zeros((4, 4), int)
    with pytest.raises(ValueError, match="shape"):
        matching(a, np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="integer"):
        matching(a.astype(float), a)
    with pytest.raises(ValueError, match="negative"):
        matching(a - 1, a)
    with pytest.raises(ValueError, match="threshold"):
        matching(a, a, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        matching(a, a, [0.5, 1.5])


def test_default_thresholds():
    assert default_thresholds(2) == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    assert default_thresholds(3) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    with pytest.raises(ValueError):
        default_thresholds(4)


def test_scalar_and_sequence_forms():
    truth = square((10, 10), (1, 1), 4)
    assert isinstance(matching(truth, truth, 0.5), Matching)
    result = matching(truth, truth, (0.5, 0.9))
    assert isinstance(result, tuple) and len(result) == 2
    assert result[0].as_dict()["tp"] == 1


def test_pooled_and_per_image():
    truth_a = square((10, 10), (0, 0), 4, out=square((10, 10), (6, 6), 3, value=2))
    pred_a = truth_a.copy()  # 2 TP
    truth_b = square((10, 10), (0, 0), 4)
    pred_b = np.zeros_like(truth_b)  # 1 FN
    pooled = matching_dataset([truth_a, truth_b], [pred_a, pred_b], 0.5)
    by_image = matching_dataset([truth_a, truth_b], [pred_a, pred_b], 0.5, by_image=True)
    assert (pooled.tp, pooled.fn, pooled.fp) == (2, 1, 0)
    assert pooled.accuracy == pytest.approx(2 / 3)
    assert by_image.accuracy == pytest.approx((1.0 + 0.0) / 2)
    assert by_image.tp == 2  # counts are summed in both modes
    table = ap_table([truth_a, truth_b], [pred_a, pred_b], [0.5, 0.9])
    assert table["ap_pooled"] == pytest.approx([2 / 3, 2 / 3])
    assert table["ap_per_image"] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError):
        pool([pooled, matching(truth_a, pred_a, 0.7)])


# ---------------------------------------------------------------------------- StarDist


@pytest.mark.parametrize("ndim", [2, 3])
def test_agrees_with_stardist(ndim):
    sd = pytest.importorskip("stardist.matching")
    rng = np.random.default_rng(ndim)
    shape = (40, 40) if ndim == 2 else (10, 18, 18)
    max_size = 10 if ndim == 2 else 7
    thresholds = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    truths, preds = [], []
    for trial in range(40):
        truth = random_labels(rng, shape, int(rng.integers(0, 25)), max_size)
        if trial % 3 == 0:
            pred = random_labels(rng, shape, int(rng.integers(0, 25)), max_size)
        else:
            pred = np.roll(truth, tuple(rng.integers(-2, 3, ndim)), axis=tuple(range(ndim)))
            pred = np.where(rng.random(shape) < 0.15, 0, pred)
        truths.append(truth)
        preds.append(pred)
        ours = matching(truth, pred, thresholds)
        theirs = sd.matching(truth, pred, thresholds)
        for a, b in zip(ours, theirs, strict=True):
            for field in FIELDS:
                assert getattr(a, field) == pytest.approx(getattr(b, field), abs=1e-6), field
    for by_image in (False, True):
        ours = matching_dataset(truths, preds, thresholds, by_image=by_image)
        theirs = sd.matching_dataset(
            truths, preds, thresholds, by_image=by_image, show_progress=False
        )
        for a, b in zip(ours, theirs, strict=True):
            for field in FIELDS:
                assert getattr(a, field) == pytest.approx(getattr(b, field), abs=1e-6), field


# ---------------------------------------------------------------------------- properties


labels_strategy = arrays(
    np.uint16,
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.integers(0, 6),
)


@settings(max_examples=25, deadline=None)
@given(labels_strategy)
def test_self_match_is_perfect(labels):
    results = matching(labels, labels, [0.1, 0.5, 0.9, 1.0])
    n = len(np.unique(labels[labels > 0]))
    for m in results:
        assert (m.tp, m.fp, m.fn, m.n_true) == (n, 0, 0, n)
        assert m.accuracy == (1.0 if n else 0.0)


@settings(max_examples=25, deadline=None)
@given(labels_strategy, labels_strategy, st.permutations(list(range(1, 7))))
def test_permuting_ids_changes_nothing(truth, pred, permutation):
    pred = np.resize(pred, truth.shape)
    lookup = np.array([0, *permutation], dtype=np.uint16)
    thresholds = [0.1, 0.3, 0.5, 0.8]
    expected = [asdict(m) for m in matching(truth, pred, thresholds)]
    for got in (matching(lookup[truth], pred, thresholds), matching(truth, lookup[pred], thresholds)):
        # counts exactly; IoU sums may add in another order (last-bit differences)
        assert [asdict(m) for m in got] == [pytest.approx(e, rel=1e-12, abs=1e-12) for e in expected]


# ---------------------------------------------------------------------------- scale


def grid_of_squares(n_per_side, pitch=4, size=3):
    side = n_per_side * pitch
    yy, xx = np.mgrid[0:side, 0:side]
    inside = (yy % pitch < size) & (xx % pitch < size)
    labels = np.zeros((side, side), np.uint32)
    labels[inside] = ((yy // pitch) * n_per_side + xx // pitch + 1)[inside]
    return labels


def test_hundred_thousand_objects():
    truth = grid_of_squares(317)  # 100,489 squares of 3x3
    n = 317 * 317
    # shift by (1, 2): each object touches two predicted ones, 2 px each (IoU 2/16),
    # a chain through every row, so the assignment below 0.5 is a real one
    pred = np.roll(truth, (1, 2), axis=(0, 1))
    low, high = matching(truth, pred, [0.1, 0.5])
    assert (low.tp, low.fp, low.fn, low.n_true, low.n_pred) == (n, 0, 0, n, n)
    assert low.mean_matched_score == pytest.approx(2 / 16)
    assert (high.tp, high.fp, high.fn) == (0, n, n)
    # shift by one pixel along X: IoU 6/12 = 0.5 exactly for every object
    pred = np.roll(truth, 1, axis=1)
    m = matching(truth, pred, 0.5)
    assert (m.tp, m.fp, m.fn) == (n, 0, 0)
