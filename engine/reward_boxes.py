"""Accuracy of detection and grounding answers (answer type "boxes"): boxes parsed from the answer, scored by IoU
against the gold boxes the way V-Triune's detection verifier does (MiniMax-AI/One-RL-to-See-Them-All, read at
commit 39bcf0d; our own code).

Answer and gold forms: V-Triune's list of labelled boxes `[{'bbox_2d': [x1, y1, x2, y2], 'label': 'dog'}, ...]`
(single or double quotes; other keys such as 'confidence' ignored), or bare boxes `[x1, y1, x2, y2]` /
`[[x1, y1, x2, y2], ...]` (label ""). A box needs four finite numbers with x1 <= x2 and y1 <= y2 (others are
dropped), a box repeated with the same coordinates counts once (reward_server/utils/det_helper.py:35-46), and a list
cut off mid-way (a response at its token limit) keeps its complete boxes (det_helper.py:21-23). Labels compare
case-insensitively (verify.py:388-389 lower-cases both answers).

Score in [0, 1] (verify.py DetectionVerifier.verify_accuracy, lines 353-533, with DET_IOU_THRESHOLD "average", the
verifier's default when it is unset (verify.py:183-199), and the `iou_max_iou_first` term):
  for each IoU threshold t in 0.5, 0.55, ..., 0.95, 0.99 (verify.py:329), match greedily: the unmatched
  (prediction, gold) pair with the highest IoU, then the next, until the best left is below t
  (det_helper.py:137-181); a matched pair earns its IoU when the labels agree, else 0 (det_helper.py:171-173);
  score_t = earned IoU / number of gold boxes (verify.py:310);
  score = mean over t of score_t (verify.py:345-350), times 0.6 ** |#predicted - #gold| (verify.py:424-426).
Dynamic threshold (the GRPO stage's default, `grpo.box_iou = "dynamic"`): V-Triune's release trains with
DET_IOU_THRESHOLD=dynamic (scripts/reward_server.sh:4), which scores at ONE threshold that rises with training
progress instead of averaging the eleven: with r = step / total_steps, 0.85 while r <= 0.1, 0.95 while r <= 0.25,
then 0.99 (verify.py:453-461, r from BaseVerifier.__init__, verify.py:67). The step is verl's global step, 1-based
(verl/trainer/ppo/ray_trainer.py:902-903), one per rollout batch, out of total_training_steps (ray_trainer.py:519);
`iou_threshold_at` takes the same numbers. Distillation and evaluation have no training step: they average.
Not reproduced: the per-row mix with the completeness, label-first and mAP terms (`det_reward_ratio` in each row's
verifier_parm), and the rescaling of predicted boxes from the model's input size to a 0-1000 frame
(`det_verifier_normalized`, verify.py:408-416): here the answer and the gold must use the same coordinate frame.
Nor a quirk of the released matching loop: it rebinds its loop variables (det_helper.py:155-161), so with several
boxes it pairs the last unmatched prediction and gold and credits them the best IoU; here the best pair is matched.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass

IOU_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
"""V-Triune's thresholds, whose scores are averaged (reward_server/verify.py:329)."""
SIZE_PENALTY = 0.6
"""Factor per box of difference between the predicted and gold counts (verify.py:425)."""


DYNAMIC_SCHEDULE = ((0.1, 0.85), (0.25, 0.95), (1.0, 0.99))
"""V-Triune's dynamic IoU threshold: (up to this fraction of the training steps, threshold), verify.py:453-461."""


def iou_threshold_at(step: int, total_steps: int) -> float:
    """V-Triune's dynamic IoU threshold at training step `step` (1-based) of `total_steps` (rollout batches):
    0.85 while step / total_steps <= 0.1, 0.95 while <= 0.25, then 0.99 (verify.py:453-461)."""
    if total_steps < 1 or step < 0:
        raise ValueError(f"iou_threshold_at: need step >= 0 and total_steps >= 1, got {step}, {total_steps}")
    ratio = step / total_steps
    return next((t for upto, t in DYNAMIC_SCHEDULE if ratio <= upto), DYNAMIC_SCHEDULE[-1][1])


def box_iou_threshold(mode: str, step: int, total_steps: int) -> float:
    """The threshold `box_score` uses for `grpo.box_iou = mode` at a step: 0.0 (the mean over IOU_THRESHOLDS) for
    "average", `iou_threshold_at(step, total_steps)` for "dynamic"."""
    if mode == "average":
        return 0.0
    if mode == "dynamic":
        return iou_threshold_at(step, total_steps)
    raise ValueError(f"box IoU mode {mode!r} not in {{dynamic, average}}")


@dataclass(frozen=True, slots=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""


def _box(coords, label) -> Box | None:
    if not isinstance(coords, (list, tuple)) or len(coords) != 4:
        return None
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coords):
        return None
    x1, y1, x2, y2 = (float(c) for c in coords)
    if x1 > x2 or y1 > y2 or not isinstance(label, str):
        return None
    return Box(x1, y1, x2, y2, label.strip().lower())


def _boxes(value) -> list[Box]:
    """Valid boxes of a parsed value: one bare box, or a list of bare boxes / {'bbox_2d', 'label'} dicts."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    if len(value) == 4 and all(isinstance(c, (int, float)) for c in value):
        value = [value]
    out, seen = [], set()
    for item in value:
        box = _box(item.get("bbox_2d"), item.get("label", "")) if isinstance(item, dict) else _box(item, "")
        if box is not None and (box.x1, box.y1, box.x2, box.y2) not in seen:
            seen.add((box.x1, box.y1, box.x2, box.y2))
            out.append(box)
    return out


def _literal(text: str):
    try:
        return ast.literal_eval(text)  # Python literals only: nothing is executed
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)  # JSON spellings literal_eval rejects (true, null)
    except (ValueError, RecursionError):
        return None


def parse_boxes(text: str) -> list[Box]:
    """The boxes of an answer text (see the module docstring); [] when it holds none."""
    start = text.find("[")
    if start < 0:
        start = text.find("{")
        if start < 0:
            return []
    body = text[start:]
    candidates = [body[:body.rfind("]") + 1], body[:body.rfind("}") + 1]]
    cut = max(body.rfind("},"), body.rfind("],"))
    if cut > 0:  # a list cut off mid-way: its complete boxes, closed
        candidates.append(body[:cut + 1] + "]")
    for candidate in candidates:
        if candidate:
            boxes = _boxes(_literal(candidate))
            if boxes:
                return boxes
    return []


def looks_like_boxes(gold: str) -> bool:
    """True for a gold in V-Triune's labelled-box form (`bbox_2d` keys): such a row is scored by IoU even when its
    answer type is not declared."""
    return "bbox_2d" in gold and bool(parse_boxes(gold))


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes; boxes that only touch overlap 0; two identical empty boxes 1."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    if w <= 0 or h <= 0:
        return 1.0 if (a.x1, a.y1, a.x2, a.y2) == (b.x1, b.y1, b.x2, b.y2) else 0.0
    inter = w * h
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union


def box_score(pred: list[Box], gold: list[Box], threshold: float = 0.0) -> float:
    """V-Triune's IoU score of predicted against gold boxes, in [0, 1] (see the module docstring): at one IoU
    `threshold` (the dynamic schedule), or the mean over IOU_THRESHOLDS when it is 0.0 ("average")."""
    if not pred or not gold:
        return 0.0
    # Every pair, best IoU first (ties in prediction-then-gold order): the greedy order of det_helper.py:155-164.
    pairs = sorted(((iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gold)),
                   key=lambda x: (-x[0], x[1], x[2]))
    thresholds = (threshold,) if threshold else IOU_THRESHOLDS
    total = 0.0
    for t in thresholds:
        used_pred, used_gold, earned = set(), set(), 0.0
        for value, i, j in pairs:
            if value < t:
                break
            if i in used_pred or j in used_gold:
                continue
            used_pred.add(i)
            used_gold.add(j)
            earned += value if pred[i].label == gold[j].label else 0.0
        total += earned / len(gold)
    return total / len(thresholds) * SIZE_PENALTY ** abs(len(pred) - len(gold))
