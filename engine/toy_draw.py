"""Sample generator for the toy world: PIL-drawn pictures with verifiable questions and synthetic responses.

Task families, each with an answer that follows from what was drawn (a world picks its in-distribution and
held-out families, ToySpec.tasks / ood_tasks; the defaults are the first three and count_shape):
  count_color   "How many red shapes ...?"                  -> integer string, e.g. "3"
  major_color   "Which color appears most often ...?" (A-D) -> option letter, e.g. "B"
  digit_sum     "What is the sum of the digits ...?"        -> integer string, e.g. "12"
  main_color    "What color are most of the shapes?"        -> free text, a colour name, e.g. "red"
  count_shapes  "How many shapes are in the picture?"       -> integer string, e.g. "6"
  count_shape   "How many triangles ...?"                   -> integer string, e.g. "2"

How hard they are for the toy model (measured, docs/LOG.md): main_color has one colour on most cells, so every
image token carries the answer, and the tiny model learns it in ~100 steps; count_shapes needs the share of
non-background cells, learnt to ~90% in ~400 steps; count_color, major_color and digit_sum need one colour or digit
picked out of a few cells, which the tiny model barely learns in the demo's budget.

The picture is a grid of cells of `CELL_PX` pixels; every object sits inside its own cell, so objects never touch
and each shape is one connected region of one exact colour (drawing is not anti-aliased). Tests rely on that to
re-count shapes from pixels. Digits use Pillow's embedded bitmap font (no font file, no FreeType, so identical
pixels everywhere), scaled up 2x with nearest-neighbour.

All randomness comes from the `random.Random` passed in, so a seed fixes every pixel and every string.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from engine.toy_spec import CELL_PX

TASKS = ("count_color", "major_color", "digit_sum")
"""Task family names of the train and test splits, in the order samples cycle through them."""
OOD_TASKS = ("count_shape",)
"""Task families held out of training: only the test_ood split has them (out-of-distribution evaluation)."""

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
}
"""Colour name -> exact RGB fill. Distinct from the background and from each other."""

SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 245)
DIGIT_INK = (20, 20, 20)
OPTION_LETTERS = ("A", "B", "C", "D")


@dataclass
class ToyObject:
    """One drawn object: a shape of a colour, or a digit (kind "digit", colour "ink")."""

    kind: str
    color: str
    digit: int
    cx: int
    cy: int


@dataclass
class ToySample:
    """One generated example plus the metadata needed to verify it."""

    task: str
    problem: str
    answer: str
    choices: list[str]
    image: Image.Image
    reasoning: str
    """A correct one- or two-sentence derivation of the answer, used for formatted SFT responses."""
    summary: str
    """A plain sentence stating the result, used for untagged SFT responses."""
    objects: list[ToyObject] = field(default_factory=list)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cells(rng: random.Random, image_size: int, n: int) -> list[tuple[int, int]]:
    """Pick n distinct grid cells and return their jittered centres in pixels, in reading order."""
    side = image_size // CELL_PX
    centres = []
    for i in sorted(rng.sample(range(side * side), n)):
        x0, y0 = (i % side) * CELL_PX, (i // side) * CELL_PX
        centres.append((x0 + CELL_PX // 2 + rng.randint(-2, 2), y0 + CELL_PX // 2 + rng.randint(-2, 2)))
    return centres


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, rgb: tuple[int, int, int], cx: int, cy: int) -> None:
    # Radius 9 plus the +-2 jitter keeps every shape >= 1 px inside its 28 px cell, so neighbours never touch.
    r = 9
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif kind == "square":
        draw.rectangle((cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1), fill=rgb)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r, cy + r - 1)], fill=rgb)


def _draw_digit(canvas: Image.Image, digit: int, cx: int, cy: int) -> None:
    font = ImageFont.load_default_imagefont()  # bitmap font embedded in Pillow: 6x11 px per glyph
    glyph = Image.new("L", (6, 11), 0)
    ImageDraw.Draw(glyph).text((0, 0), str(digit), font=font, fill=255)
    glyph = glyph.resize((12, 22), Image.Resampling.NEAREST)
    canvas.paste(Image.new("RGB", glyph.size, DIGIT_INK), (cx - 6, cy - 11), glyph)


def _render(objects: list[ToyObject], image_size: int) -> Image.Image:
    canvas = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        if obj.kind == "digit":
            _draw_digit(canvas, obj.digit, obj.cx, obj.cy)
        else:
            _draw_shape(draw, obj.kind, COLORS[obj.color], obj.cx, obj.cy)
    return canvas


def _place(rng: random.Random, image_size: int, colors: list[str]) -> list[ToyObject]:
    """Shapes of the given colours (one per entry, random kind) at random distinct cells, in random order."""
    colors = list(colors)
    rng.shuffle(colors)
    centres = _cells(rng, image_size, len(colors))
    return [ToyObject(rng.choice(SHAPES), c, -1, x, y) for c, (x, y) in zip(colors, centres, strict=True)]


def _count_color(rng: random.Random, image_size: int) -> ToySample:
    target = rng.choice(list(COLORS))
    num_target = rng.randint(1, 5)
    others = [rng.choice([c for c in COLORS if c != target]) for _ in range(rng.randint(1, 5))]
    objects = _place(rng, image_size, [target] * num_target + others)
    by_kind = [(k, sum(o.kind == k and o.color == target for o in objects)) for k in SHAPES]
    parts = [_plural(n, f"{target} {k}") for k, n in by_kind if n > 0]
    question = rng.choice([f"How many {target} shapes are in the picture?", f"Count the {target} shapes in the image."])
    total = _plural(num_target, f"{target} shape")
    return ToySample(
        task="count_color", problem="<image>" + question, answer=str(num_target), choices=[],
        image=_render(objects, image_size), objects=objects,
        reasoning=f"I see {_join(parts)}, so there {'is' if num_target == 1 else 'are'} {total}.",
        summary=f"There {'is' if num_target == 1 else 'are'} {total}.",
    )


def _major_color(rng: random.Random, image_size: int) -> ToySample:
    options = rng.sample(list(COLORS), 4)
    winner = rng.choice(options)
    top = rng.randint(2, 5)
    # Every other option strictly below the winner, so the answer is unique; at most 5 + 3 * 3 = 14 <= 16 cells.
    counts = {c: top if c == winner else rng.randint(0, min(top - 1, 3)) for c in options}
    objects = _place(rng, image_size, [c for c in options for _ in range(counts[c])])
    letter = OPTION_LETTERS[options.index(winner)]
    lines = "\n".join(f"{L}. {c}" for L, c in zip(OPTION_LETTERS, options, strict=True))
    question = rng.choice(["Which color appears most often among the shapes?", "What is the most frequent color?"])
    tally = _join([f"{counts[c]} {c}" for c in sorted(options, key=lambda c: -counts[c])])
    return ToySample(
        task="major_color", problem=f"<image>{question}\n{lines}", answer=letter, choices=list(options),
        image=_render(objects, image_size), objects=objects,
        reasoning=f"I count {tally} shapes, so {winner} is the most frequent color, which is option {letter}.",
        summary=f"The most frequent color is {winner}.",
    )


def _digit_sum(rng: random.Random, image_size: int) -> ToySample:
    centres = _cells(rng, image_size, rng.randint(2, 4))
    objects = [ToyObject("digit", "ink", rng.randint(0, 9), x, y) for x, y in centres]
    digits = [str(o.digit) for o in objects]
    total = sum(o.digit for o in objects)
    question = rng.choice(
        ["What is the sum of the digits in the picture?", "Add up all the digits shown in the image."]
    )
    return ToySample(
        task="digit_sum", problem="<image>" + question, answer=str(total), choices=[],
        image=_render(objects, image_size), objects=objects,
        reasoning=f"The digits are {_join(digits)}, and {' + '.join(digits)} = {total}.",
        summary=f"The digits add up to {total}.",
    )


def _main_color(rng: random.Random, image_size: int) -> ToySample:
    """Open-ended: the gold is a colour name, not a choice or a number (a judge may score paraphrases)."""
    main = rng.choice(list(COLORS))
    num_main = rng.randint(3, 10)
    # Fewer than half as many of the others, so the main colour is clearly the most frequent.
    others = [rng.choice([c for c in COLORS if c != main]) for _ in range(rng.randint(0, num_main // 2 - 1))]
    objects = _place(rng, image_size, [main] * num_main + others)
    question = rng.choice(["What color are most of the shapes?", "Which color do most shapes in the image have?"])
    return ToySample(
        task="main_color", problem="<image>" + question, answer=main, choices=[],
        image=_render(objects, image_size), objects=objects,
        reasoning=f"Most of the shapes are {main}.", summary=f"Most of the shapes are {main}.",
    )


def _count_shapes(rng: random.Random, image_size: int) -> ToySample:
    num = rng.randint(1, 8)
    objects = _place(rng, image_size, [rng.choice(list(COLORS)) for _ in range(num)])
    question = rng.choice(["How many shapes are in the picture?", "Count all the shapes in the image."])
    total = _plural(num, "shape")
    return ToySample(
        task="count_shapes", problem="<image>" + question, answer=str(num), choices=[],
        image=_render(objects, image_size), objects=objects,
        reasoning=f"I count {total} in the picture.",
        summary=f"There {'is' if num == 1 else 'are'} {total}.",
    )


def _count_shape(rng: random.Random, image_size: int) -> ToySample:
    """Held out of training (OOD_TASKS): counting by shape instead of colour, in words the training text lacks."""
    target = rng.choice(SHAPES)
    num_target = rng.randint(1, 5)
    objects = _cells(rng, image_size, num_target + rng.randint(1, 5))
    kinds = [target] * num_target + [rng.choice([k for k in SHAPES if k != target]) for _ in objects[num_target:]]
    rng.shuffle(kinds)
    objects = [ToyObject(k, rng.choice(list(COLORS)), -1, x, y) for k, (x, y) in zip(kinds, objects, strict=True)]
    question = rng.choice([f"How many {target}s can you find in the picture?", f"Tally the {target}s in the image."])
    total = _plural(num_target, target)
    return ToySample(
        task="count_shape", problem="<image>" + question, answer=str(num_target), choices=[],
        image=_render(objects, image_size), objects=objects,
        reasoning=f"Looking for {target}s only, I find {total}.",
        summary=f"There {'is' if num_target == 1 else 'are'} {total}.",
    )


_MAKERS = {"count_color": _count_color, "major_color": _major_color, "digit_sum": _digit_sum,
           "main_color": _main_color, "count_shapes": _count_shapes, "count_shape": _count_shape}


def make_sample(rng: random.Random, task: str, image_size: int) -> ToySample:
    """Draw one sample of a task family.

    Args:
        rng: the only source of randomness.
        task: one of engine.toy_spec.KNOWN_TASKS.
        image_size: side of the square RGB image in pixels; a multiple of `CELL_PX`.

    Returns:
        The sample, with its image, question, answer and the objects drawn.
    """
    return _MAKERS[task](rng, image_size)


def make_response(sample: ToySample, rng: random.Random, formatted: bool) -> str:
    """A synthetic assistant response: tagged `<think>..</think><answer>..</answer>` or plain text with no tags."""
    if formatted:
        lead = rng.choice(["", "Let me look at the picture. ", "Let me check the image carefully. "])
        return f"<think>{lead}{sample.reasoning}</think><answer>{sample.answer}</answer>"
    return rng.choice([
        sample.answer,
        f"The answer is {sample.answer}.",
        f"{sample.summary} The answer is {sample.answer}.",
        f"{sample.reasoning} So the answer is {sample.answer}.",
    ])


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG with no metadata; Pillow's zlib output is byte-stable for a given Pillow build."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
