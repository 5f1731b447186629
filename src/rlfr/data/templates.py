"""Prompt templates: how a problem becomes the text the policy continues.

Contract: ``render_prompt(template, problem, tokenizer=None, num_images=0, image_token=None, system=None) -> str``
for ``template`` in ``TEMPLATES``; ``system`` is the system turn (``data.system_prompt``, or a chat row's own):
None = the template's default, ``""`` = no system turn (a template without one refuses any other value).
``response_end(template)``: the text that closes the assistant turn in a training sequence (SFT, flow
pretraining), or None for the tokenizer's EOS token.

- ``"chat"``: the tokenizer's own chat template on ``[system, user: problem]`` (default system: the boxed-answer
  instruction ``SYSTEM_PROMPT``) with the generation prompt appended (needs a tokenizer with a chat template).
- ``"qwen_math_box"``: the plain Qwen2.5-Math prompt with the boxed system prompt (ChatML).
- ``"llama_box"``: a Llama-3 instruct prompt (header tokens written out) whose user turn asks for a boxed
  answer; no system turn.
- ``"r1"``: the DeepSeek-R1-Zero prompt (DeepSeek-R1 paper, Table 1) asking for
  ``<think> ... </think> <answer> ... </answer>``; ``rlfr.reward.verifier.extract_answer`` reads the answer tag.

These three begin with the tokenizer's BOS token when its encoding adds one (Llama, Gemma, Mistral: prompts are
encoded with ``add_special_tokens=False``, so a BOS must be in the text, as a chat template writes it); Qwen's
tokenizer adds none, so their text is unchanged there.

The authors' templates, reproduced by name (docs/RLFR_METHOD.md §9; ``tests/test_templates_tasks.py`` checks each against
the rendering of their code, token for token):
- ``"authors_llama3"``: their RL prompt for Llama-3.1 (``llama_text`` in their
  ``openrlhf/openrlhf/datasets/prompts_dataset.py``): ``<|begin_of_text|>``, a system turn holding the boxed
  instruction, then the user turn, with single newlines between each header and its content and a newline before
  each ``<|eot_id|>``.
- ``"authors_flow_qwen"``: their flow-pretraining data for the Qwen models, LLaMA-Factory's ``template: qwen``
  (their ``LLaMA-Factory/src/llamafactory/data/template.py``): ChatML with Qwen's default system prompt ``You are
  Qwen, created by Alibaba Cloud. You are a helpful assistant.``; the assistant turn ends ``<|im_end|>\\n``.
- ``"authors_flow_llama3"``: their flow-pretraining data for Llama-3.1-8B, LLaMA-Factory's ``template: llama3``:
  ``<|begin_of_text|>``, no system turn unless one is given, double newlines after each header, the assistant
  turn ends ``<|eot_id|>``. (Not the single-newline RL prompt above: their two stages format Llama differently.)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

IMAGE_TAG = "<image>"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class Plain:
    """A template written out: ``prefix + system turn (if any) + body``, each with ``{system}`` / ``{problem}``."""

    body: str
    system_turn: str | None = None  # None: the template has no system turn
    default_system: str = ""  # "" = no system turn unless one is given
    prefix: str = ""
    end: str | None = None  # what closes the assistant turn in training sequences (None: the tokenizer's EOS)


_CHATML_USER = "<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_PLAIN = {
    "qwen_math_box": Plain(_CHATML_USER, _CHATML_SYSTEM, SYSTEM_PROMPT),
    "llama_box": Plain(
        "<|start_header_id|>user<|end_header_id|>\n\n{problem}\n" + SYSTEM_PROMPT + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "r1": Plain(
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
        "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
        "</answer>. User: {problem}. Assistant:"
    ),
    "authors_llama3": Plain(
        "<|start_header_id|>user<|end_header_id|>\n{problem}\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n",
        "<|start_header_id|>system<|end_header_id|>\n{system}\n<|eot_id|>",
        SYSTEM_PROMPT,
        prefix="<|begin_of_text|>",
    ),
    "authors_flow_qwen": Plain(_CHATML_USER, _CHATML_SYSTEM, QWEN_SYSTEM_PROMPT, end="<|im_end|>\n"),
    "authors_flow_llama3": Plain(
        "<|start_header_id|>user<|end_header_id|>\n\n{problem}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        prefix="<|begin_of_text|>",
        end="<|eot_id|>",
    ),
}
TEMPLATES = ("chat", *_PLAIN)
_OWN_BOS = ("qwen_math_box", "llama_box", "r1")  # rlfr's plain templates: the BOS as the tokenizer encodes


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
    """``render_prompt`` of an ``Example``: its problem, its system turn and, for a vision-language processor,
    its images."""
    return render_prompt(
        template, example.problem, tokenizer, len(example.images), getattr(tokenizer, "image_token", None),
        example.system,
    )  # fmt: skip


def response_end(template: str) -> str | None:
    """The text closing the assistant turn in training sequences, or None for the tokenizer's EOS token."""
    return _PLAIN[template].end if template in _PLAIN else None


def _chat(problem: str, tokenizer: Any, num_images: int, image_token: str | None, system: str | None) -> str:
    if tokenizer is None:
        raise ValueError("template 'chat' needs a tokenizer (with a chat template)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"template 'chat': tokenizer {type(tokenizer).__name__} has no chat_template; "
            f"use one of {TEMPLATES[1:]} instead"
        )
    system = SYSTEM_PROMPT if system is None else system
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_content(problem, num_images)})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if num_images and (image_token is None or text.count(image_token) != num_images):
        raise ValueError(
            f"the chat template of {type(tokenizer).__name__} rendered {text.count(image_token or '')} image "
            f"placeholders {image_token!r} for {num_images} images: it does not place image parts; use the "
            "vision-language model's own chat template"
        )
    return text


def render_prompt(
    template: str,
    problem: str,
    tokenizer: Any = None,
    num_images: int = 0,
    image_token: str | None = None,
    system: str | None = None,
) -> str:
    """The prompt string for ``problem`` under ``template`` (one of ``TEMPLATES``); with ``num_images`` > 0
    the chat template's image placeholders, one ``image_token`` per image (module docstring)."""
    if num_images and template != "chat":
        raise ValueError(
            f"template {template!r} has no place for images; use data.template=chat (the model's chat template)"
        )
    if template == "chat":
        return _chat(problem, tokenizer, num_images, image_token, system)
    if template not in _PLAIN:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    t = _PLAIN[template]
    if t.system_turn is None and system:
        raise ValueError(
            f"template {template!r} has no system turn; data.system_prompt (or a chat row's system turn) needs one "
            f"that has: chat, {', '.join(k for k, v in _PLAIN.items() if v.system_turn is not None)}"
        )
    system = t.default_system if system is None else system
    head = t.system_turn.replace("{system}", system) if system else ""
    bos = tokenizer.bos_token if template in _OWN_BOS and adds_bos(tokenizer) else ""
    # str.replace, not str.format: problems contain LaTeX braces.
    return bos + t.prefix + head + t.body.replace("{problem}", problem)


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> adds_bos, measured once


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` starts an encoding with its BOS token (None, or a processor without one: False);
    measured once per tokenizer (every prompt is rendered through here)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not getattr(tokenizer, "bos_token", None):
        return False
    if tokenizer not in _ADDS_BOS:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        _ADDS_BOS[tokenizer] = bool(ids) and ids[0] == bos_id
    return _ADDS_BOS[tokenizer]
