"""The toy world's spec: every setting that determines it, and their checks.

`engine/toy.py` builds the world from a `ToySpec`; the `toy` stage's config (engine/stages/config.py) is a
`ToySpec` with a stage name, so a recipe's toy table and `build_toy_world` take the same fields. A leaf module
(no torch, no PIL), so the recipe loader can import it cheaply.
"""

import dataclasses

CELL_PX = 28
"""Grid cell size of the toy pictures in pixels; 28 = one merged 2x2 block of 14-pixel vision patches."""
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
"""Special tokens, in id order, right after the BPE vocabulary (as in Qwen2.5-VL)."""
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
"""Added as ordinary (non-special) tokens: single ids, yet kept by decode(skip_special_tokens=True)."""
KNOWN_TASKS = ("count_color", "major_color", "digit_sum", "main_color", "count_shapes", "count_shape")
"""Task families engine/toy_draw.py can draw; what each asks is in its module docstring."""


@dataclasses.dataclass(kw_only=True)
class ToySpec:
    """Everything that determines the toy world; the same spec gives byte-identical files."""

    seed: int = 0
    """Seeds the pictures, questions, response wording, formatted-row choice and model init."""
    num_train: int = 512
    """Rows in train.parquet (and sft.parquet); their task families cycle through `tasks`."""
    num_test: int = 128
    """Rows in test.parquet, drawn from an independent stream of the same seed."""
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["count_color", "major_color", "digit_sum"])
    """Task families of train.parquet and test.parquet (in distribution), from `KNOWN_TASKS`."""
    ood_tasks: list[str] = dataclasses.field(default_factory=lambda: ["count_shape"])
    """Task families of test_ood.parquet. Held out of training (none of them in `tasks`), unless the OOD pictures
    differ (`ood_image_size`): then they may be trained families asked about pictures never trained on."""
    format_share: float = 0.4
    """Share of sft rows whose response is <think>..</think><answer>..</answer>; exactly round(share * num_train)."""
    image_size: int = 112
    """Side of the square RGB images in pixels; a multiple of 28, >= 112 (112 -> 8x8 patches -> 16 vision tokens)."""
    ood_image_size: int = 0
    """Side of test_ood's pictures in pixels (0: `image_size`). Larger pictures have more grid cells (168 px: 6x6)
    and the model's image processor (max_pixels = image_size^2) shrinks them to image_size, so the shapes come out
    smaller and blurred, several per vision token: a visual shift away from everything trained on."""
    hidden_size: int = 64
    """Language model width; also the vision merger's output width."""
    num_layers: int = 2
    """Language model decoder layers."""
    num_heads: int = 4
    """Attention heads; head_dim = hidden_size / num_heads must be even (M-RoPE)."""
    num_kv_heads: int = 2
    """Key/value heads (GQA); divides num_heads."""
    intermediate_size: int = 128
    """Language model MLP width."""
    vision_hidden_size: int = 32
    """Vision tower width (2 heads); its MLP is twice as wide."""
    vision_depth: int = 2
    """Vision tower blocks; the last one uses full attention."""
    vocab_size: int = 1024
    """Upper bound on the tokenizer size, 11 added tokens included; BPE stops early once the toy corpus has no more
    pairs to merge (about 480 tokens at the defaults). The model's embedding is len(tokenizer) padded to 64."""

    def check(self) -> list[str]:
        """Returns one message per invalid field (empty when the spec is usable)."""
        # ToySpec's own integer fields (a subclass, the toy stage config, adds fields of its own); seed and
        # ood_image_size may be 0.
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(ToySpec)
                 if f.type is int and f.name not in ("seed", "ood_image_size")}
        errors = [f"{k} must be >= 1, got {v}" for k, v in sizes.items() if v < 1]
        for key in ("tasks", "ood_tasks"):
            names = getattr(self, key)
            if not names:
                errors.append(f"{key} must name at least one task family, e.g. {list(KNOWN_TASKS[:3])}")
            if unknown := [t for t in names if t not in KNOWN_TASKS]:
                errors.append(f"{key}: unknown task famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                              f"known: {list(KNOWN_TASKS)}")
        shifted = self.ood_image_size not in (0, self.image_size)
        if (both := sorted(set(self.tasks) & set(self.ood_tasks))) and not shifted:
            errors.append(f"ood_tasks must be held out of tasks (or drawn at another ood_image_size), but {both} "
                          f"is in both")
        if not 0.0 <= self.format_share <= 1.0:
            errors.append(f"format_share must be in [0, 1], got {self.format_share}")
        # A picture needs up to 14 free grid cells (major_color), i.e. a 4x4 grid of 28 px cells.
        for key in ("image_size", "ood_image_size"):
            size = getattr(self, key)
            if (key == "image_size" or size) and (size % CELL_PX or size < 4 * CELL_PX):
                errors.append(f"{key} must be a multiple of {CELL_PX} (patch 14 x merge 2) and >= {4 * CELL_PX} "
                              f"(room for 14 shapes), got {size}")
        if self.hidden_size % max(self.num_heads, 1) or (self.hidden_size // max(self.num_heads, 1)) % 2:
            errors.append(f"hidden_size / num_heads must be an even integer (M-RoPE), got "
                          f"{self.hidden_size} / {self.num_heads}")
        if self.num_heads % max(self.num_kv_heads, 1):
            errors.append(f"num_kv_heads must divide num_heads, got {self.num_kv_heads} and {self.num_heads}")
        if self.vision_hidden_size % 8:
            errors.append(f"vision_hidden_size must be a multiple of 8 (2 heads, 2-D RoPE), "
                          f"got {self.vision_hidden_size}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS) + len(TAG_TOKENS):
            errors.append(f"vocab_size must be >= 267 (256 bytes + 11 added tokens), got {self.vocab_size}")
        return errors
