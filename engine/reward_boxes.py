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
Not reproduced: the per-row mix with the completeness, label-first and mAP terms (`det_reward_ratio` in each row's
verifier_parm), the "dynamic" threshold schedule over training steps (one threshold: 0.85 for the first 10% of the
steps, 0.95 up to 25%, then 0.99, verify.py:453-461; the release's scripts/reward_server.sh sets it), and the
rescaling of
predicted boxes from the model's input size to a 0-1000 frame (`det_verifier_normalized`, verify.py:408-416): here
the answer and the gold must use the same coordinate frame.
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


def box_score(pred: list[Box], gold: list[Box]) -> float:
    """V-Triune's IoU score of predicted against gold boxes, in [0, 1] (see the module docstring)."""
    if not pred or not gold:
        return 0.0
    # Every pair, best IoU first (ties in prediction-then-gold order): the greedy order of det_helper.py:155-164.
    pairs = sorted(((iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gold)),
                   key=lambda x: (-x[0], x[1], x[2]))
    total = 0.0
    for t in IOU_THRESHOLDS:
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
    return total / len(IOU_THRESHOLDS) * SIZE_PENALTY ** abs(len(pred) - len(gold))
