"""engine/reward_boxes.py: boxes parsed from answers, IoU, V-Triune's greedy IoU score (against a direct re-statement
of its matching loop), and the accuracy reward of detection/grounding rows in rewards.score and a GRPO batch."""

import random

import pytest

from engine.data import Sample
from engine.reward_boxes import IOU_THRESHOLDS, Box, box_iou_threshold, box_score, iou, iou_threshold_at, parse_boxes
from engine.rewards import RewardConfig, answer_type, score
from engine.rollout import Completion
from engine.stages.experience import score_groups

GOLD = "[{'bbox_2d': [10, 12, 40, 44], 'label': 'dog'}]"  # an Orsta detection gold without its <answer> wrapper


def test_parse_boxes_forms():
    assert parse_boxes("[{'bbox_2d': [1, 2, 3, 4], 'label': 'Dog', 'confidence': 0.9}]") == [Box(1, 2, 3, 4, "dog")]
    assert parse_boxes('Here: [{"bbox_2d": [1, 2, 3, 4], "label": "cat", "ok": true}] done') == [Box(1, 2, 3, 4, "cat")]
    assert parse_boxes("The box is [1, 2.5, 3, 4].") == [Box(1, 2.5, 3, 4)]
    assert parse_boxes("[[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]]") == [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]  # dup once
    # x1 > x2, three coordinates, a string coordinate: dropped; the valid box stays
    assert parse_boxes("[[3, 2, 1, 4], [1, 2, 3], [1, 2, 3, 'x'], [0, 0, 1, 1]]") == [Box(0, 0, 1, 1)]
    # a list cut off mid-way keeps its complete boxes
    assert parse_boxes("[{'bbox_2d': [1, 2, 3, 4], 'label': 'a'}, {'bbox_2d': [5, 6") == [Box(1, 2, 3, 4, "a")]
    assert parse_boxes("[[1, 2, 3, 4], [5, 6, 7") == [Box(1, 2, 3, 4)]
    for junk in ("no boxes", "", "[", "[1, 2]", "[{'label': 'dog'}]", "[" * 5000 + "]" * 5000, "[__import__('os')]"):
        assert parse_boxes(junk) == [], junk


def test_iou():
    assert iou(Box(0, 0, 10, 10), Box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(Box(0, 0, 10, 10), Box(10, 0, 20, 10)) == 0.0  # touching
    assert iou(Box(0, 0, 10, 10), Box(0, 0, 10, 10)) == 1.0
    assert iou(Box(1, 1, 1, 5), Box(1, 1, 1, 5)) == 1.0 and iou(Box(1, 1, 1, 5), Box(1, 1, 2, 5)) == 0.0


def test_box_score_by_hand():
    dog = Box(0, 0, 10, 10, "dog")
    assert box_score([dog], [dog]) == 1.0
    shifted = Box(0, 0, 10, 8, "dog")  # IoU 0.8: earned at the 7 thresholds <= 0.8 of 11
    assert box_score([shifted], [dog]) == pytest.approx(0.8 * 7 / 11)
    assert box_score([Box(0, 0, 10, 10, "cat")], [dog]) == 0.0  # matched, wrong label: no credit
    far = Box(50, 50, 60, 60, "dog")
    assert box_score([dog, far], [dog]) == pytest.approx(0.6)  # one extra box: x 0.6
    assert box_score([dog], [dog, far]) == pytest.approx(0.5 * 0.6)  # one missed of two, x 0.6
    assert box_score([], [dog]) == 0.0


def _vtriune_loop(pred, gold):
    """The matching as V-Triune states it (det_helper.py:137-181, verify.py:293-350): for each threshold, repeatedly
    take the unmatched pair of largest IoU (first in prediction-then-gold order on ties) until it is below t."""
    total = 0.0
    for t in IOU_THRESHOLDS:
        free_p, free_g, earned = list(range(len(pred))), list(range(len(gold))), 0.0
        while free_p and free_g:
            best, bi, bj = -1.0, -1, -1
            for i in free_p:
                for j in free_g:
                    if iou(pred[i], gold[j]) > best:
                        best, bi, bj = iou(pred[i], gold[j]), i, j
            if best < t:
                break
            earned += best if pred[bi].label == gold[bj].label else 0.0
            free_p.remove(bi)
            free_g.remove(bj)
        total += earned / len(gold)
    return total / len(IOU_THRESHOLDS) * 0.6 ** abs(len(pred) - len(gold))


def test_box_score_equals_the_matching_loop():
    rng = random.Random(0)

    def box():
        x, y = rng.randint(0, 20), rng.randint(0, 20)
        return Box(x, y, x + rng.randint(1, 12), y + rng.randint(1, 12), rng.choice("ab"))

    for _ in range(300):
        gold = [box() for _ in range(rng.randint(1, 4))]
        pred = [box() for _ in range(rng.randint(1, 5))] + [Box(g.x1, g.y1, g.x2 + 1, g.y2, g.label)
                                                            for g in gold[:rng.randint(0, 2)]]
        assert box_score(pred, gold) == pytest.approx(_vtriune_loop(pred, gold), abs=1e-12)


def test_accuracy_reward_of_box_rows():
    right = f"<think>The dog.</think><answer>{GOLD}</answer>"
    r = score(right, GOLD)
    assert (r.method, r.format, r.accuracy, r.total) == ("boxes", 0.5, 1.0, 1.5)
    partial = score("<think>x</think><answer>[{'bbox_2d': [10, 12, 40, 38], 'label': 'dog'}]</answer>", GOLD)
    assert 0 < partial.accuracy < 1  # IoU 0.8125: partial credit
    assert score("<think>x</think><answer>a dog</answer>", GOLD).accuracy == 0.0
    assert answer_type(GOLD) == "boxes"
    # a bare-box gold is scored by IoU when the row declares "boxes"; an unparseable one is counted as such
    assert score("<answer>[10, 12, 40, 44]</answer>", "[10, 12, 40, 44]", declared_type="boxes").accuracy == 1.0
    bad = score("<answer>[10, 12, 40, 44]</answer>", "a dog", declared_type="boxes")
    assert bad.gold_unparseable and bad.accuracy == 0.0
    assert score(right, GOLD, cfg=RewardConfig(accuracy_weight=2.0)).accuracy == 2.0


def test_grpo_batch_scores_detection_rows_by_iou():
    """The GRPO stage's scoring (no answer type passed) gives an Orsta detection row its IoU accuracy, not 0."""
    prompt = Sample([1], None, [0], None, None, 1, "v3det-3", answer=GOLD, choices=None)
    texts = [f"<think>a</think><answer>{GOLD}</answer>", "<think>a</think><answer>[]</answer>"]
    rewards, tally = score_groups([[Completion(0, [1], t, [0.0], "stop") for t in texts]], [prompt], RewardConfig())
    assert [r.accuracy for r in rewards[0]] == [1.0, 0.0] and tally is None


def test_grpo_batch_passes_the_declared_type_for_bare_box_golds():
    """A row whose answer_type column says "boxes" and whose gold is bare boxes is scored by IoU in the GRPO stage's
    scoring (the declared type comes from the row infos); without the declaration the rules find no match."""
    from engine.reward_judge import RowInfo

    prompt = Sample([1], None, [0], None, None, 1, "grounding-1", answer="[10, 12, 40, 44]", choices=None)
    texts = ["<think>a</think><answer>[10, 12, 40, 44]</answer>"]
    groups = [[Completion(0, [1], t, [0.0], "stop") for t in texts]]
    declared, _ = score_groups(groups, [prompt], RewardConfig(), {"grounding-1": RowInfo("q", answer_type="boxes")})
    assert declared[0][0].method == "boxes" and declared[0][0].accuracy == 1.0
    plain, _ = score_groups(groups, [prompt], RewardConfig())
    assert plain[0][0].method != "boxes"


def test_dynamic_threshold_schedule():
    """V-Triune's DET_IOU_THRESHOLD=dynamic (reward_server/verify.py:453-461): 0.85 while step / total <= 0.1, 0.95
    while <= 0.25, then 0.99; steps are 1-based."""
    at = {step: iou_threshold_at(step, 100) for step in (1, 10, 11, 25, 26, 100)}
    assert at == {1: 0.85, 10: 0.85, 11: 0.95, 25: 0.95, 26: 0.99, 100: 0.99}
    assert [iou_threshold_at(s, 8) for s in range(1, 9)] == [0.95, 0.95] + [0.99] * 6  # 1/8 > 0.1
    assert iou_threshold_at(1, 1) == 0.99
    assert box_iou_threshold("average", 1, 100) == 0.0 and box_iou_threshold("dynamic", 1, 100) == 0.85
    with pytest.raises(ValueError, match="total_steps >= 1"):
        iou_threshold_at(1, 0)
    with pytest.raises(ValueError, match="not in"):
        box_iou_threshold("fixed", 1, 10)


def test_reward_at_a_fixed_iou_changes_across_the_threshold_step():
    """A prediction of IoU 0.9 earns 0.9 while the threshold is 0.85 (step 10 of 100) and 0 once it is 0.95 (step 11);
    the average mode gives the mean over the eleven thresholds."""
    gold = "[{'bbox_2d': [0, 0, 10, 10], 'label': 'dog'}]"
    answer = "<think>x</think><answer>[{'bbox_2d': [0, 0, 10, 9], 'label': 'dog'}]</answer>"  # IoU 90 / 100
    early, late = (score(answer, gold, cfg=RewardConfig(box_iou_threshold=iou_threshold_at(s, 100))) for s in (10, 11))
    assert early.accuracy == pytest.approx(0.9) and late.accuracy == 0.0
    assert score(answer, gold).accuracy == pytest.approx(0.9 * 9 / 11)  # earned at the 9 thresholds <= 0.9
    assert box_score([Box(0, 0, 10, 10)], [Box(0, 0, 10, 10)], 0.99) == 1.0


@pytest.mark.parametrize("mode,start", [("dynamic", 0), ("dynamic", 10), ("average", 0)])
def test_grpo_stage_passes_the_rollout_step_to_the_box_reward(monkeypatch, mode, start):
    """GRPOStage.fit sets each rollout batch's box threshold from its 1-based index out of the stage's rollout batches
    (a resumed stage continues the schedule)."""
    from types import SimpleNamespace

    from engine.config import parse_stage
    from engine.stages import grpo

    cfg = parse_stage({"name": "g", "kind": "grpo", "init": "model", "data": {"train": "x.parquet"},
                       "grpo": {"box_iou": mode}})
    stage, seen = grpo.GRPOStage(cfg), {}

    def fake_collect(collector, index):
        seen[index] = collector.reward.box_iou_threshold
        return SimpleNamespace(stats={})

    monkeypatch.setattr(grpo, "collect", fake_collect)
    monkeypatch.setattr(stage, "collector", lambda run: SimpleNamespace(reward=RewardConfig(),
                                                                        backend=SimpleNamespace(close=lambda: None)))
    monkeypatch.setattr(stage, "mini_batch", lambda *a: SimpleNamespace(rows=[], num_passes=1))
    trainer = SimpleNamespace(step=start, total_steps=20, run_step=lambda *a, **k: None)
    stage.fit(SimpleNamespace(trainer=trainer))
    if mode == "average":
        assert set(seen.values()) == {0.0}
    else:
        want = {i: 0.85 if i < 2 else 0.95 if i < 5 else 0.99 for i in range(start, 20)}  # steps 1-2, 3-5, 6-20
        assert seen == want
