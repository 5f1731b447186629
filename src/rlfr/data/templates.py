"""Prompt templates: how a problem becomes the text the policy continues.

Contract: ``render_prompt(template, problem, tokenizer=None) -> str`` for ``template`` in ``TEMPLATES``:

- ``"chat"``: the tokenizer's own chat template on ``[system: SYSTEM_PROMPT, user: problem]`` with the
  generation prompt appended (needs a tokenizer that has a chat template).
- ``"qwen_math_box"``: the plain Qwen2.5-Math prompt with the boxed system prompt (ChatML).
- ``"llama_box"``: a Llama-3 instruct prompt (header tokens written out) whose user turn asks for a boxed
  answer. No ``<|begin_of_text|>``: the tokenizer adds BOS when it encodes.
- ``"r1"``: the DeepSeek-R1-Zero prompt (DeepSeek-R1 paper, Table 1) asking for
  ``<think> ... </think> <answer> ... </answer>``; ``rlfr.reward.verifier.extract_answer`` reads the answer tag.
"""

from __future__ import annotations

from typing import Any

IMAGE_TAG = "<image>"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("chat", "qwen_math_box", "llama_box", "r1")

QWEN_MATH_BOX = (
    "<|im_start|>system\n"
    + SYSTEM_PROMPT
    + "<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
)
LLAMA_BOX = (
    "<|start_header_id|>user<|end_header_id|>\n\n{problem}\n" + SYSTEM_PROMPT + "<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
R1 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {problem}. Assistant:"
)
_PLAIN = {"qwen_math_box": QWEN_MATH_BOX, "llama_box": LLAMA_BOX, "r1": R1}


def user_content(problem: str, num_images: int) -> str | list[dict]:
    """The user turn of a chat: the problem, or with images a list of image and text parts (docstring)."""
    if num_images == 0:
        return problem
    tags = problem.count(IMAGE_TAG)
    if tags not in (0, num_images):
        raise ValueError(
            f"the problem holds {tags} {IMAGE_TAG} tags for {num_images} images; give one tag per image or none"
        )
    if tags == 0:
        return [{"type": "image"}] * num_images + [{"type": "text", "text": problem}]
    parts: list[dict] = []
    for i, text in enumerate(problem.split(IMAGE_TAG)):
        if i:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def example_prompt(template: str, example, tokenizer: Any = None) -> str:
    """``render_prompt`` of an ``Example``: its problem and, for a vision-language processor, its images."""
    return render_prompt(
        template, example.problem, tokenizer, len(example.images), getattr(tokenizer, "image_token", None)
    )


def render_prompt(
    template: str, problem: str, tokenizer: Any = None, num_images: int = 0, image_token: str | None = None
) -> str:
    """The prompt string for ``problem`` under ``template`` (one of ``TEMPLATES``); with ``num_images`` > 0
    the chat template's image placeholders, one ``image_token`` per image (module docstring)."""
    if num_images and template != "chat":
        raise ValueError(
            f"template {template!r} has no place for images; use data.template=chat (the model's chat template)"
        )
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs a tokenizer (with a chat template)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template 'chat': tokenizer {type(tokenizer).__name__} has no chat_template; "
                f"use one of {TEMPLATES[1:]} instead"
            )
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_content(problem, num_images)},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if num_images and (image_token is None or text.count(image_token) != num_images):
            raise ValueError(
                f"the chat template of {type(tokenizer).__name__} rendered {text.count(image_token or '')} image "
                f"placeholders {image_token!r} for {num_images} images: it does not place image parts; use the "
                "vision-language model's own chat template"
            )
        return text
    if template in _PLAIN:
        # str.replace, not str.format: problems contain LaTeX braces.
        return _PLAIN[template].replace("{problem}", problem)
    raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
