"""Fairness metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from onnxrepair import metrics as M

# 8 rows: privileged (a=1) rows 0-3, unprivileged (a=0) rows 4-7
A = np.array([1, 1, 1, 1, 0, 0, 0, 0])
Y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
P = np.array([1, 1, 1, 0, 1, 0, 0, 0])


def test_accuracy():
    # wrong: row 2 (pred 1, y 0), row 5 (pred 0, y 1) -> 6/8
    assert M.accuracy(Y, P) == pytest.approx(0.75)


def test_spd():
    # P(ŷ=1|unpriv) = 1/4, P(ŷ=1|priv) = 3/4 -> -0.5
    assert M.statistical_parity_difference(P, A) == pytest.approx(-0.5)
    # favourable label 0: 3/4 - 1/4
    assert M.statistical_parity_difference(P, A, favorable=0) == pytest.approx(0.5)


def test_eod():
    # TPR_priv = 2/2, TPR_unpriv = 1/2 -> -0.5
    assert M.equal_opportunity_difference(Y, P, A) == pytest.approx(-0.5)


def test_aaod():
    # FPR_priv = 1/2 (row 2 of rows 2,3), FPR_unpriv = 0/2; TPR diff 0.5 -> 0.5 * (0.5 + 0.5)
    assert M.average_abs_odds_difference(Y, P, A) == pytest.approx(0.5)


def test_aaod_equal_groups_is_zero():
    a = np.array([1, 1, 0, 0])
    y = np.array([1, 0, 1, 0])
    p = np.array([1, 0, 1, 0])
    assert M.average_abs_odds_difference(y, p, a) == 0.0
    assert M.statistical_parity_difference(p, a) == 0.0


def test_idr():
    assert M.individual_discrimination_rate(np.array([0, 1, 1, 0, 1]), np.array([0, 0, 1, 1, 1])) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        M.individual_discrimination_rate(np.zeros(3), np.zeros(4))


def test_custom_group_values_and_other_values_ignored():
    a = np.array([2, 2, 5, 5, 9, 9])  # 9 is in neither group
    p = np.array([1, 1, 0, 1, 0, 0])
    # unpriv (5): 1/2; priv (2): 2/2
    assert M.statistical_parity_difference(p, a, privileged=2, unprivileged=5) == pytest.approx(-0.5)


def test_empty_group_is_nan():
    assert math.isnan(M.statistical_parity_difference(np.array([1, 0]), np.array([1, 1])))


def test_report_and_relative_change():
    r = M.fairness_report(Y, P, A, pair_preds=(np.array([1, 0]), np.array([1, 1])))
    assert r["abs_spd"] == pytest.approx(0.5) and r["idr"] == pytest.approx(0.5)
    assert r["n_privileged"] == 4 and r["n_unprivileged"] == 4
    assert M.relative_change(0.2, 0.15) == pytest.approx(-0.25)
    assert math.isnan(M.relative_change(0.0, 0.1))


# ----------------------------------------------------------------------------- distinct gaps
# The fixture above has TPR gap == FPR gap (both -0.5), so a metric reading FPR where it should read TPR
# gives the same numbers there. Below, SPD, the TPR gap and the FPR gap all differ, in value and in sign.
#
# privileged (a=1), 8 rows: 4 positives, 2 predicted favourable -> TPR_p = 2/4
#                           4 negatives, 3 predicted favourable -> FPR_p = 3/4;   P(fav | priv)   = 5/8
# unprivileged (a=0), 10 rows: 4 positives, 4 predicted favourable -> TPR_u = 4/4
#                              6 negatives, 1 predicted favourable -> FPR_u = 1/6; P(fav | unpriv) = 5/10
A2 = np.array([1] * 8 + [0] * 10)
Y2 = np.array([1, 1, 1, 1, 0, 0, 0, 0] + [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P2 = np.array([1, 1, 0, 0, 1, 1, 1, 0] + [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
SPD2 = 5 / 10 - 5 / 8  # -0.125
EOD2 = 4 / 4 - 2 / 4  # +0.5  (TPR gap)
FPR_GAP2 = 1 / 6 - 3 / 4  # -0.5833 (what an EOD computed from FPR would give)
AAOD2 = 0.5 * (abs(FPR_GAP2) + abs(EOD2))  # 13/24


def test_distinct_gaps_hand_computed():
    assert len({round(v, 6) for v in (SPD2, EOD2, FPR_GAP2, AAOD2, abs(FPR_GAP2), 0.5 * abs(EOD2))}) == 6
    assert M.statistical_parity_difference(P2, A2) == pytest.approx(SPD2)
    assert M.equal_opportunity_difference(Y2, P2, A2) == pytest.approx(EOD2)
    assert M.average_abs_odds_difference(Y2, P2, A2) == pytest.approx(AAOD2)
    r = M.fairness_report(Y2, P2, A2)
    assert (r["spd"], r["eod"], r["aaod"]) == pytest.approx((SPD2, EOD2, AAOD2))
    assert (r["abs_spd"], r["abs_eod"]) == pytest.approx((abs(SPD2), abs(EOD2)))
    assert (r["n_privileged"], r["n_unprivileged"], r["n"]) == (8, 10, 18)
    assert r["accuracy"] == pytest.approx((2 + 1 + 4 + 5) / 18)


def test_distinct_gaps_groups_swapped_flip_signs():
    # the same rows with the roles of the groups swapped: signed differences change sign, AAOD does not
    assert M.statistical_parity_difference(P2, A2, privileged=0, unprivileged=1) == pytest.approx(-SPD2)
    assert M.equal_opportunity_difference(Y2, P2, A2, privileged=0, unprivileged=1) == pytest.approx(-EOD2)
    assert M.average_abs_odds_difference(Y2, P2, A2, privileged=0, unprivileged=1) == pytest.approx(AAOD2)


def test_distinct_gaps_favourable_zero():
    # favourable label 0: "positive" rows are y == 0 and a favourable prediction is 0
    # priv: y=0 rows 4-7 predicted 0: 1 of 4 -> TPR_p = 1/4; y=1 rows 0-3 predicted 0: 2 of 4 -> FPR_p = 2/4
    # unpriv: y=0 rows predicted 0: 5 of 6 -> TPR_u = 5/6; y=1 rows predicted 0: 0 of 4 -> FPR_u = 0
    tpr_gap, fpr_gap = 5 / 6 - 1 / 4, 0 - 2 / 4
    assert M.equal_opportunity_difference(Y2, P2, A2, favorable=0) == pytest.approx(tpr_gap)
    assert M.average_abs_odds_difference(Y2, P2, A2, favorable=0) == pytest.approx(0.5 * (abs(fpr_gap) + abs(tpr_gap)))
    assert M.statistical_parity_difference(P2, A2, favorable=0) == pytest.approx(5 / 10 - 3 / 8)


# AIF360's ClassificationMetric, written out from its definitions (aif360/metrics/classification_metric.py):
# counts per group from the binary confusion matrix with the favourable label as "positive";
#   true_positive_rate  = TP / P,   false_positive_rate = FP / N,   selection_rate = (TP + FP) / (P + N)
#   statistical_parity_difference = selection_rate(unpriv) - selection_rate(priv)   (BinaryLabelDatasetMetric
#     .statistical_parity_difference on the predictions: base rate of the *predicted* labels)
#   equal_opportunity_difference  = TPR(unpriv) - TPR(priv)
#   average_abs_odds_difference   = 0.5 * (|FPR(unpriv) - FPR(priv)| + |TPR(unpriv) - TPR(priv)|)
def _aif360_counts(y, p, a, group, fav):
    tp = fp = pos = neg = 0
    for yi, pi, ai in zip(y, p, a):
        if ai != group:
            continue
        if yi == fav:
            pos += 1
            tp += pi == fav
        else:
            neg += 1
            fp += pi == fav
    return {"TPR": tp / pos, "FPR": fp / neg, "SR": (tp + fp) / (pos + neg)}


def test_cross_check_with_aif360_definitions():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 300)
    y = rng.integers(0, 2, 300)
    # a predictor that favours the privileged group differently on positives and negatives
    p = np.where(y == 1, rng.random(300) < np.where(a == 1, 0.8, 0.55), rng.random(300) < np.where(a == 1, 0.1, 0.3)).astype(int)
    for fav in (1, 0):
        u, q = _aif360_counts(y, p, a, 0, fav), _aif360_counts(y, p, a, 1, fav)
        spd, eod = u["SR"] - q["SR"], u["TPR"] - q["TPR"]
        aaod = 0.5 * (abs(u["FPR"] - q["FPR"]) + abs(u["TPR"] - q["TPR"]))
        assert abs(abs(u["FPR"] - q["FPR"]) - abs(eod)) > 0.05  # the case tells TPR from FPR
        assert M.statistical_parity_difference(p, a, favorable=fav) == pytest.approx(spd, abs=1e-12)
        assert M.equal_opportunity_difference(y, p, a, favorable=fav) == pytest.approx(eod, abs=1e-12)
        assert M.average_abs_odds_difference(y, p, a, favorable=fav) == pytest.approx(aaod, abs=1e-12)


def test_report_passes_group_values_and_favourable_label_through():
    # every figure of the report must be the one its function gives for the same groups and favourable label
    for kw in ({"favorable": 0}, {"privileged": 0, "unprivileged": 1}, {"privileged": 0, "unprivileged": 1, "favorable": 0}):
        r = M.fairness_report(Y2, P2, A2, **kw)
        assert r["spd"] == pytest.approx(M.statistical_parity_difference(P2, A2, **kw))
        assert r["eod"] == pytest.approx(M.equal_opportunity_difference(Y2, P2, A2, **kw))
        assert r["aaod"] == pytest.approx(M.average_abs_odds_difference(Y2, P2, A2, **kw))
    assert M.fairness_report(Y2, P2, A2, favorable=0)["spd"] == pytest.approx(5 / 10 - 3 / 8)


def test_empty_inputs_are_nan_and_bad_pairs_say_why():
    assert math.isnan(M.accuracy(np.array([]), np.array([])))
    assert math.isnan(M.individual_discrimination_rate(np.array([]), np.array([])))
    with pytest.raises(ValueError, match="differ in shape"):
        M.individual_discrimination_rate(np.zeros(3), np.zeros(4))


def test_protected_values_given_as_text_are_read_as_numbers():
    # a protected column read from text ("1"/"0") groups like the numbers it spells
    assert M.statistical_parity_difference(P2, A2.astype(str)) == pytest.approx(SPD2)
