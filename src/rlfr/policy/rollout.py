"""Rollouts: batched sampling with Hugging Face ``generate`` and the packed layout the update uses.

Layout (``Rollout``): every sequence is ``[left padding][prompt][response][right padding]`` in one
(B, T) tensor, so all per-token tensors (log-probs, latents, rewards) share the positions of
``input_ids``. Groups are contiguous: rows ``g*n .. g*n+n-1`` are the n samples of prompt g.
A response ends at (and includes) the first EOS, or at ``max_new_tokens``.

``SamplingParams``: how any sampler (``rlfr.policy.sampler``) samples: n per prompt, the length limit,
temperature / top-p or greedy, and the seed.

``encode_solutions(tokenizer, examples, prompts, end=None) -> Solutions`` gives the (prompt, response = solution +
EOS, or solution + ``end`` for a template that closes its assistant turn with text) token lists of worked solutions (and their image inputs), which ``Solutions.pack`` lays out like rollouts (SFT
and flow pretraining).

Vision-language policies: ``generate(..., images=...)`` with an ``ImageTextProcessor`` as the tokenizer, and
the ``Rollout`` carries each row's image inputs (``vision``, a ``rlfr.policy.vision.VisionBatch``) through
``select`` and ``to``, so micro-batches and minibatch permutations keep every row with its own images. The
prompt holds the expanded image placeholders; the response mask covers response tokens only, so no image
token is ever a flow target or gets a reward, and generation suppresses the vision special tokens (a
generated placeholder would have no image behind it).

Sampling is plain temperature / top-p sampling: the model's own generation config (top-k 50,
repetition penalty, ...) is deliberately not used, so rollouts follow the policy's distribution.

``generate(..., capture=tap)`` (opt-in; ``rlfr select``, never the RL step) also records the tapped latents and
the log-probs while it samples (``rlfr.policy.capture``): the ``Rollout``'s ``captured``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rlfr.policy.capture import Captured, RowCapture, assemble, chunk_rows, generate_captured
from rlfr.policy.latents import LatentTap
from rlfr.policy.vision import ImageTextProcessor, VisionBatch, images_of, vision_inputs


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    response_mask: torch.Tensor  # (B, T) bool
    group: torch.Tensor  # (B,) long, index of the prompt in the step's prompt list
    completions: list[str]  # decoded responses (special tokens removed)
    truncated: torch.Tensor  # (B,) bool, hit max_new_tokens without EOS
    vision: VisionBatch | None = None  # image inputs of the rows (vision-language policies)
    # (B, T) float32: the sampling engine's log-prob of each response token (vLLM), 0 elsewhere; None for HF
    engine_logp: torch.Tensor | None = None
    # latents and log-probs recorded during generation (generate(..., capture=tap)); None otherwise
    captured: Captured | None = None

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def to(self, device) -> Rollout:
        return Rollout(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
            self.group.to(device), self.completions, self.truncated.to(device),
            None if self.vision is None else self.vision.to(device),
            None if self.engine_logp is None else self.engine_logp.to(device),
            None if self.captured is None else self.captured.to(device),
        )  # fmt: skip

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        idx = rows if isinstance(rows, slice) else rows.tolist()
        comps = self.completions[idx] if isinstance(idx, slice) else [self.completions[i] for i in idx]
        return Rollout(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.response_mask[rows],
            self.group[rows],
            comps,
            self.truncated[rows],
            None if self.vision is None else self.vision.select(rows),
            None if self.engine_logp is None else self.engine_logp[rows],
            None if self.captured is None else self.captured.select(rows),
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: one value per field, checked on creation."""

    n: int = 1  # completions per prompt
    max_new_tokens: int = 256  # response length limit (EOS included)
    temperature: float = 1.0  # softmax temperature (> 0); unused when greedy
    top_p: float = 1.0  # nucleus threshold in (0, 1]; unused when greedy
    greedy: bool = False  # argmax decoding: no randomness, n identical copies
    seed: int | None = None  # None: torch's global RNG; an int: reproducible, global RNG untouched

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams: n and max_new_tokens must be >= 1, got {self.n}, {self.max_new_tokens}"
            )
        if not self.greedy and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(
                f"SamplingParams: temperature must be > 0 and top_p in (0, 1] (got {self.temperature}, "
                f"{self.top_p}); use greedy=True for argmax decoding"
            )


def eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token; generation would never stop")
    return sorted(ids)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    num_generations: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    images: Sequence[Sequence] | None = None,
    device: torch.device | None = None,
    capture: LatentTap | None = None,
    progress: str | None = None,
) -> Rollout:
    """Sample ``num_generations`` responses per prompt; returns the packed layout described above.
    ``images``: each prompt's images, given exactly when ``tokenizer`` is an ``ImageTextProcessor``.
    ``device``: where the inputs go (default: the first parameter's device; under FSDP with CPU offload that is
    the CPU, so the trainer passes the accelerator's device). ``capture``: a tap on ``model`` whose latents, and
    the log-probs, are recorded while sampling (``Rollout.captured``; text-only policies). ``progress``: the
    description of a progress bar over the sequences generated (None: no bar); it draws no random numbers."""
    eos = eos_ids(tokenizer, model)
    prompt_ids, vision = encode_prompts(tokenizer, prompts, images)
    if capture is not None and vision is not None:
        raise ValueError("capturing latents during generation supports text-only policies, not images")
    pad = tokenizer.pad_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
        suppress_tokens=tokenizer.suppress_ids if vision is not None else None,
    )
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    expanded = [(g, ids) for g, ids in enumerate(prompt_ids) for _ in range(num_generations)]
    vision_rows = None if vision is None else vision.repeat_interleave(num_generations)
    responses: list[list[int]] = []
    truncated: list[bool] = []
    captured: list[RowCapture] = []
    bar = tqdm(total=len(expanded), desc=progress, unit="seq", disable=progress is None, leave=False)
    try:
        for start in range(0, len(expanded), batch_size):
            chunk = [ids for _, ids in expanded[start : start + batch_size]]
            width = max(len(c) for c in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, c in enumerate(chunk):
                inp[i, width - len(c) :] = torch.tensor(c)
                att[i, width - len(c) :] = 1
            extra = {}
            if vision_rows is not None:
                extra = vision_inputs(vision_rows.select(slice(start, start + batch_size)).to(device),
                                      inp.to(device)) or {}  # fmt: skip
            if capture is None:
                out = model.generate(
                    input_ids=inp.to(device),
                    attention_mask=att.to(device),
                    generation_config=gen_cfg,
                    **extra,
                )
            else:
                out, steps, logp = generate_captured(model, capture, inp.to(device), att.to(device), gen_cfg)
            first = len(responses)
            for row in out[:, width:].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), None)
                responses.append(row[:cut] if cut is not None else row)
                truncated.append(cut is None)
            if capture is not None:
                captured += chunk_rows(
                    steps, logp, [len(c) for c in chunk], [len(r) for r in responses[first:]]
                )
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    ro = pack(
        tokenizer, [ids for _, ids in expanded], responses, [g for g, _ in expanded], truncated, vision_rows
    )
    if capture is not None:
        ro.captured = assemble(captured, [len(ids) for _, ids in expanded], capture)
    return ro


def encode_prompts(
    tokenizer, prompts: Sequence[str], images: Sequence[Sequence] | None
) -> tuple[list[list[int]], VisionBatch | None]:
    """Prompt token ids (and, for a vision-language processor, the image inputs): images are given exactly when
    ``tokenizer`` is an ``ImageTextProcessor`` (a list of empty tuples for text-only prompts)."""
    if isinstance(tokenizer, ImageTextProcessor):
        if images is None:
            raise ValueError("a vision-language policy needs the prompts' images (images=[...] per prompt)")
        return tokenizer.encode(prompts, images)
    if images is not None:
        raise ValueError("images were given but the tokenizer is text-only (not an ImageTextProcessor)")
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], None


def pack(
    tokenizer,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    group: Sequence[int],
    truncated: Sequence[bool] | None = None,
    vision: VisionBatch | None = None,
    response_logp: Sequence[Sequence[float]] | None = None,
) -> Rollout:
    """Token lists -> the packed (B, T) layout (prompts left-padded, responses right-padded); ``vision``: the
    rows' image inputs, checked against the image placeholders of each prompt (none in any response);
    ``response_logp`` (one value per response token) becomes ``engine_logp``."""
    if vision is not None:
        expected = vision.tokens_per_row.tolist()
        for i, (p, r) in enumerate(zip(prompts, responses)):
            n_p = sum(1 for t in p if t == vision.image_token_id)
            if n_p != expected[i] or vision.image_token_id in r:
                raise ValueError(
                    f"row {i}: {n_p} image tokens in the prompt for {expected[i]} image patches (merged), "
                    f"{sum(1 for t in r if t == vision.image_token_id)} in the response (must be 0)"
                )
    pad = tokenizer.pad_token_id
    p_len = max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in responses))
    b = len(prompts)
    ids = torch.full((b, p_len + r_len), pad, dtype=torch.long)
    att = torch.zeros((b, p_len + r_len), dtype=torch.long)
    resp = torch.zeros((b, p_len + r_len), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        att[i, p_len - len(p) : p_len + len(r)] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(r, dtype=torch.long)
            resp[i, p_len : p_len + len(r)] = True
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    trunc = torch.tensor(list(truncated) if truncated is not None else [False] * b, dtype=torch.bool)
    logp = None
    if response_logp is not None:
        logp = torch.zeros((b, p_len + r_len), dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(responses, response_logp)):
            if len(lp) != len(r):
                raise ValueError(f"response {i}: {len(r)} tokens but {len(lp)} log-probs")
            logp[i, p_len : p_len + len(r)] = torch.tensor(list(lp), dtype=torch.float32)
    return Rollout(ids, att, resp, torch.tensor(list(group), dtype=torch.long), completions, trunc,
                   vision=vision, engine_logp=logp)  # fmt: skip


@dataclass
class Solutions:
    """Worked solutions as token lists: prompt ids, response ids (solution + EOS) and, for a vision-language
    policy, the image inputs of every example (``rows(idx)`` gives those of some examples)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    vision: VisionBatch | None = None

    def pack(self, tokenizer, rows: Sequence[int]) -> Rollout:
        """The packed layout of examples ``rows`` (group = position in ``rows``)."""
        vision = None if self.vision is None else self.vision.select(list(rows))
        return pack(tokenizer, [self.prompt_ids[i] for i in rows], [self.response_ids[i] for i in rows],
                    list(range(len(rows))), vision=vision)  # fmt: skip


def encode_solutions(tokenizer, examples, prompts: list[str], end: str | None = None) -> Solutions:
    """Prompt ids (images expanded for a vision-language processor) and, per example, the ids of its solution
    followed by ``end`` (the template's end of the assistant turn, ``rlfr.data.templates.response_end``; None:
    the EOS token)."""
    eos = tokenizer.eos_token_id
    p_ids, vision = encode_prompts(tokenizer, prompts, images_of(tokenizer, examples))
    if end is None:
        r_ids = [tokenizer(ex.solution, add_special_tokens=False)["input_ids"] + [eos] for ex in examples]
    else:
        r_ids = [tokenizer(ex.solution + end, add_special_tokens=False)["input_ids"] for ex in examples]
    if vision is not None:
        for ex, r in zip(examples, r_ids):
            if any(t in tokenizer.suppress_ids for t in r):
                raise ValueError(f"the solution of example {ex.id!r} holds a vision special token")
    return Solutions(p_ids, r_ids, vision)
