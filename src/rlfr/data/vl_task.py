"""The embedded multimodal task: arithmetic problems drawn in an image, needing no download.

Contract: ``vl_task(train_size, eval_size, seed) -> TaskSplits(train, eval)`` and ``render_problem(text, rng)
-> PIL.Image``; the sets ``embedded-vl`` (train split for training, held-out split for evaluation) in
``rlfr.data.sources``.

- Every problem's text is only ``QUESTION`` ("Answer the question in the image."): the numbers appear in the
  image alone, so a model must read the image to answer. The image (``IMAGE_SIZE``, black text on white, the
  text's position and shade jittered by the problem's own seed) shows ``What is a <op> b?``, a and b of 1-2
  digits, op in + - *.
- The answer is the exact value, checked by the ordinary verifier; the worked ``solution`` (for SFT and flow
  pretraining) is the step of ``rlfr.data.tasks.arithmetic_steps`` and ``\\boxed{value}``.
- Splits depend on ``seed`` (``data.task_seed``) only: held-out problems come from ``random.Random(2*seed+1)``,
  training problems from ``random.Random(2*seed)``, and no held-out expression appears in training. The
  held-out split is generated first, so it depends on ``eval_size`` and ``seed`` alone.
- Images are drawn with Pillow's built-in default font, so the pixels depend on the Pillow version only.

Departure from the paper: RLFR's multimodal runs train Qwen2.5-VL-7B on multimodal maths (MM-Eureka prompts,
MMPR traces). No small pretrained vision-language model is available offline, so this task exercises the
whole pipeline on random-init models only; it is sized so that a real small VL model could learn it.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

from rlfr.data.examples import Example
from rlfr.data.tasks import TaskSplits, _fmt, arithmetic_steps

QUESTION = "Answer the question in the image."
IMAGE_SIZE = (224, 56)  # (width, height): 8 x 2 merged 28-pixel patches for Qwen2.5-VL
_OPS = ("+", "-", "*")


def render_problem(text: str, rng: random.Random):
    """An RGB image of ``text`` (black-ish on white, position jittered by ``rng``)."""
    img = Image.new("RGB", IMAGE_SIZE, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=18) if hasattr(ImageFont, "load_default") else None
    shade = rng.randint(0, 60)
    draw.text((rng.randint(4, 40), rng.randint(4, 24)), text, fill=(shade, shade, shade), font=font)
    return img


def _problems(n: int, rng: random.Random, exclude: set[str], split: str) -> list[Example]:
    out: list[Example] = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        expr = f"{a} {rng.choice(_OPS)} {b}"
        if expr in exclude:
            continue
        exclude.add(expr)
        steps, value = arithmetic_steps(expr)
        image = render_problem(f"What is {expr}?", random.Random(f"{split}-{expr}"))
        solution = "".join(s + ".\n" for s in steps) + f"\\boxed{{{_fmt(value)}}}"
        out.append(Example(QUESTION, _fmt(value), solution, id=f"vl-{split}-{len(out)}", images=(image,)))
    raise ValueError(f"embedded-vl: only {len(out)} unique {split} problems of {n} requested")


def vl_task(train_size: int = 2000, eval_size: int = 200, seed: int = 0) -> TaskSplits:
    """Train and held-out splits of the embedded multimodal task (module docstring)."""
    seen: set[str] = set()
    held_out = _problems(eval_size, random.Random(2 * seed + 1), seen, "eval")
    train = _problems(train_size, random.Random(2 * seed), seen, "train")
    return TaskSplits(train=train, eval=held_out)
