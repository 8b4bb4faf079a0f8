"""Frame-level AP @ IoU 0.5 (the AVA Pascal evaluator) on hand-made cases with known answers."""
import math

import numpy as np
import pytest

from detect import average_precision, frame_ap, report_ap

A, B = (0.1, 0.1, 0.4, 0.9), (0.5, 0.1, 0.8, 0.9)          # two people in a keyframe
K1, K2 = ('-vid', 902), ('-vid', 903)


# IoU of a 0.3-wide box with itself moved by dx
def shifted(box, dx):
    return (box[0] + dx, box[1], box[2] + dx, box[3])


def test_perfect_detections_give_ap_one():
    gt = {K1: [(A, 12), (B, 12), (B, 79)], K2: [(A, 79)]}
    det = {K1: [(A, 12, .9), (B, 12, .8), (B, 79, .7)], K2: [(A, 79, .6)]}
    ap, n = frame_ap(gt, det, [12, 79])
    assert ap == {12: 1.0, 79: 1.0} and n == {12: 2, 79: 2}


def test_no_detections_or_wrong_places_give_zero():
    gt = {K1: [(A, 12)]}
    assert frame_ap(gt, {}, [12])[0][12] == 0.0
    assert frame_ap(gt, {K1: [(B, 12, .9)]}, [12])[0][12] == 0.0       # no overlap
    assert frame_ap(gt, {K2: [(A, 12, .9)]}, [12])[0][12] == 0.0       # right box, other keyframe
    assert frame_ap(gt, {K1: [(A, 14, .9)]}, [12, 14])[0][12] == 0.0   # right box, other class


def test_partial_overlap_counts_only_at_iou_half():
    gt = {K1: [(A, 12)]}
    # width 0.3 moved by dx: IoU = (0.3 - dx) / (0.3 + dx): 0.09 -> 0.54 (TP), 0.11 -> 0.46 (FP)
    assert frame_ap(gt, {K1: [(shifted(A, 0.09), 12, .9)]}, [12])[0][12] == 1.0
    assert frame_ap(gt, {K1: [(shifted(A, 0.11), 12, .9)]}, [12])[0][12] == 0.0


def test_duplicates_are_false_positives():
    gt = {K1: [(A, 12), (B, 12)]}
    det = {K1: [(A, 12, .9), (shifted(A, .01), 12, .8), (B, 12, .7)]}
    # TP, FP (duplicate of A), TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # -> 1/2 * 1 + 1/2 * 2/3
    assert frame_ap(gt, det, [12])[0][12] == pytest.approx(0.5 + 1 / 3)


def test_detections_are_matched_by_descending_score_within_a_keyframe():
    gt = {K1: [(A, 12)], K2: [(B, 12)]}
    # in file order the low-scored duplicate of A comes first; sorted, the .9 one takes A
    det = {K1: [(A, 12, .3), (A, 12, .9)], K2: [(B, 12, .5)]}
    # ranks: .9 TP, .5 TP, .3 FP -> AP 1
    assert frame_ap(gt, det, [12])[0][12] == 1.0


def test_a_detection_whose_best_gt_is_taken_is_a_false_positive():
    # VOC rule: a detection only tries its highest-IoU GT box, even if another box it overlaps
    # is free
    a2 = shifted(A, 0.05)                                    # IoU(A, a2) = 0.25 / 0.35 = 0.71
    gt = {K1: [(A, 12), (a2, 12)]}
    det = {K1: [(A, 12, .9), (shifted(A, 0.01), 12, .8)]}    # both closest to A
    ap, _ = frame_ap(gt, det, [12])
    assert ap[12] == pytest.approx(0.5)                     # recall stops at 1/2


def test_classes_without_gt_are_nan_and_left_out_of_the_mean(capsys):
    gt = {K1: [(A, 12)]}
    det = {K1: [(A, 12, .9), (B, 1, .9)]}
    ap, n = frame_ap(gt, det, [1, 12, 14])
    assert math.isnan(ap[1]) and math.isnan(ap[14]) and ap[12] == 1.0 and n[1] == 0
    m = report_ap(ap, n, {1: 'bend/bow (at the waist)', 12: 'stand', 14: 'walk'}, 0)
    out = capsys.readouterr().out
    assert (m == 100.0 and 'no GT' in out and '2 without GT skipped' in out
            and 'all detections kept' in out)


def test_excluded_keyframes_and_unlisted_classes_do_not_count():
    gt = {K1: [(A, 12)], K2: [(B, 12)]}
    det = {K1: [(A, 12, .5), (B, 12, .9), (A, 2, .99)], K2: [(A, 12, .95)]}
    assert frame_ap(gt, det, [12])[0][12] < 1.0
    # the FP at .95 and the missed B go away
    ap, n = frame_ap(gt, det, [12], excluded={K2})
    # .9 FP then .5 TP: precision 1/2 at recall 1
    assert n[12] == 1 and ap[12] == pytest.approx(0.5)


def test_cap_of_detections_per_keyframe():
    gt = {K1: [(A, 12), (B, 14)]}
    det = {K1: [(A, 12, .9), (A, 79, .8), (B, 14, .1)]}
    assert frame_ap(gt, det, [12, 14, 79])[0][14] == 1.0
    # ActivityNet keeps the 2 best of the keyframe
    ap, _ = frame_ap(gt, det, [12, 14, 79], max_dets=2)
    assert ap[14] == 0.0 and ap[12] == 1.0


def test_average_precision_matches_the_interpolated_definition():
    """Independent formulation: AP = (1 / #GT) x sum over true positives of the best precision at
    any rank at or below theirs (the area under the monotone envelope)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        scores, tp = rng.random(n), rng.random(n) < 0.5
        num_gt = int(tp.sum() + rng.integers(0, 4)) or 1
        order = np.argsort(-scores)
        t = tp[order]
        prec = np.cumsum(t) / np.arange(1, n + 1)
        ref = sum(prec[k:].max() for k in range(n) if t[k]) / num_gt
        assert average_precision(scores, tp, num_gt) == pytest.approx(ref)
    assert math.isnan(average_precision([], [], 0))
    assert (average_precision([.9, .8, .7, .6], [1, 0, 1, 0], 3)
            == pytest.approx(1 / 3 + 1 / 3 * 2 / 3))
