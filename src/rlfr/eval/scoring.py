"""Held-out evaluation: greedy pass@1 with the same prompts and verifier as training.

``evaluate(model, tokenizer, examples, template, max_new_tokens, verifier)`` -> ``EvalResult`` with the
accuracy and one record per example (prompt, completion, extracted answer, correct). Under several
processes each rank evaluates a shard and the records are gathered, so every rank gets the same result.

Sampled evaluation (``rlfr eval samples=K``): ``sampled_completions`` returns ``Completions`` (K texts per
prompt) from any ``rlfr.policy.sampler.Sampler``, the trainer's own (transformers ``generate`` or the vLLM
engine), so prompts and stopping are those of training. ``score_completions`` checks them with the verifier
and reports avg@K and the unbiased pass@k (``rlfr.stats.pass_at_k``) for k = 1, 2, 4, ... <= K.

``held_out_scores``: per-problem greedy and sampled correctness (``rlfr compare``, the demo), in chunks of
whole generation batches; with an ``rlfr.eval.progress.EvalProgress`` an interrupted run continues after
its last finished chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rlfr.data import Example
from rlfr.data.templates import example_prompt
from rlfr.eval.progress import EvalProgress, set_torch_rng_state, torch_rng_state
from rlfr.policy.rollout import Rollout
from rlfr.policy.sampler import Sampler, SamplingParams, TransformersSampler
from rlfr.policy.vision import images_of
from rlfr.reward.verifier import Verifier, extract_answer
from rlfr.stats import pass_at_k, powers_of_two


@dataclass
class EvalResult:
    accuracy: float
    n: int
    records: list[dict] = field(default_factory=list)
    mean_response_tokens: float = 0.0


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    template: str,
    max_new_tokens: int,
    verifier: Verifier,
    batch_size: int = 64,
    accelerator=None,
) -> EvalResult:
    if not examples:
        raise ValueError("evaluate() got no examples")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = list(range(len(examples)))[rank::world]
    prompts = [example_prompt(template, examples[i], tokenizer) for i in shard]
    images = images_of(tokenizer, [examples[i] for i in shard])
    records = []
    if shard:
        sampler = TransformersSampler(
            model, tokenizer, batch_size, accelerator.device if accelerator else None
        )
        ro = sampler.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, greedy=True), images)
        scores = verifier.verify_batch(ro.completions, [examples[i].answer for i in shard])
        lens = ro.response_lengths.tolist()
        for i, p, c, s, n in zip(shard, prompts, ro.completions, scores, lens):
            ex = examples[i]
            records.append(
                {
                    "index": i,
                    "id": ex.id,
                    "prompt": p,
                    "completion": c,
                    "answer": ex.answer,
                    "extracted": extract_answer(c),
                    "correct": bool(s >= 1.0),
                    "response_tokens": int(n),
                }
            )
    if world > 1:
        records = gather_object(records)
    records.sort(key=lambda r: r["index"])
    acc = sum(r["correct"] for r in records) / len(records)
    mean_len = sum(r["response_tokens"] for r in records) / len(records)
    return EvalResult(accuracy=acc, n=len(records), records=records, mean_response_tokens=mean_len)


# ---------------------------------------------------------------------------------------------------------
# Sampled evaluation (avg@k, pass@k) for ``rlfr eval``: generation backends return texts, scoring is shared.


@dataclass
class Completions:
    """k completions per prompt: texts[i][j] is sample j of prompt i; tokens[i][j] its response length."""

    texts: list[list[str]]
    tokens: list[list[int]]


@dataclass
class SampledEvalResult:
    n: int  # problems
    samples: int  # completions per problem (k_max)
    avg: float  # avg@k: mean fraction of correct samples (= pass@1 for greedy, one sample)
    pass_at: dict[int, float]  # k -> unbiased pass@k (Chen et al. 2021), k = 1, 2, 4, ... <= samples
    records: list[dict] = field(default_factory=list)  # one per (problem, sample)
    mean_response_tokens: float = 0.0


def rollout_completions(ro: Rollout, num_prompts: int, samples: int) -> Completions:
    """A rollout of ``samples`` responses per prompt (groups contiguous) -> ``Completions``."""
    lens = ro.response_lengths.tolist()
    texts = [ro.completions[i * samples : (i + 1) * samples] for i in range(num_prompts)]
    tokens = [[int(x) for x in lens[i * samples : (i + 1) * samples]] for i in range(num_prompts)]
    return Completions(texts, tokens)


def sampled_completions(
    sampler: Sampler, prompts: Sequence[str], params: SamplingParams, images=None
) -> Completions:
    """``params.n`` completions per prompt from ``sampler``; ``images``: each prompt's images for a
    vision-language policy."""
    return rollout_completions(sampler.generate(prompts, params, images), len(prompts), params.n)


def score_completions(
    examples: Sequence[Example], prompts: Sequence[str], comps: Completions, verifier: Verifier
) -> SampledEvalResult:
    """Check every completion and aggregate avg@k and pass@k over problems."""
    if not examples or len(examples) != len(prompts) or len(comps.texts) != len(examples):
        raise ValueError(
            f"{len(examples)} examples, {len(prompts)} prompts, {len(comps.texts)} completion lists"
        )
    k = len(comps.texts[0])
    if k < 1 or any(len(t) != k for t in comps.texts):
        raise ValueError("every problem needs the same number (>= 1) of completions")
    flat = [c for texts in comps.texts for c in texts]
    scores = verifier.verify_batch(flat, [ex.answer for ex in examples for _ in range(k)])
    records, counts = [], []
    for i, ex in enumerate(examples):
        ok = [scores[i * k + j] >= 1.0 for j in range(k)]
        counts.append(sum(ok))
        for j in range(k):
            c = comps.texts[i][j]
            records.append(
                {
                    "index": i,
                    "sample": j,
                    "id": ex.id,
                    "prompt": prompts[i],
                    "completion": c,
                    "answer": ex.answer,
                    "extracted": extract_answer(c),
                    "correct": ok[j],
                    "response_tokens": comps.tokens[i][j],
                }
            )
    n = len(examples)
    return SampledEvalResult(
        n=n,
        samples=k,
        avg=sum(counts) / (n * k),
        pass_at={kk: sum(pass_at_k(k, c, kk) for c in counts) / n for kk in powers_of_two(k)},
        records=records,
        mean_response_tokens=sum(r["response_tokens"] for r in records) / len(records),
    )


@dataclass
class HeldOut:
    """Per-problem results: ``greedy[i]`` 1 if problem i is solved greedily; ``sampled[i]`` how many of
    ``samples`` samples at temperature 1 solve it (None when ``samples`` is 0)."""

    greedy: list[int]
    sampled: list[int] | None
    samples: int

    @property
    def greedy_accuracy(self) -> float:
        return sum(self.greedy) / len(self.greedy)

    @property
    def sampled_accuracy(self) -> float | None:
        return None if self.sampled is None else sum(self.sampled) / (self.samples * len(self.sampled))


def held_out_scores(
    model,
    tokenizer,
    examples: Sequence[Example],
    template: str,
    max_new_tokens: int,
    verifier: Verifier,
    samples: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    progress: EvalProgress | None = None,
    bar: str | None = None,
) -> HeldOut:
    """Greedy pass@1 and (``samples`` > 0) the correct count of ``samples`` samples at temperature 1 per
    problem, the RL sampler's setting; the sampling noise is seeded, so every model sees the same.

    The problems go in chunks of whole generation batches (``batch_size`` sequences), greedy first, then
    sampled, so the result equals that of one ``evaluate`` call and, after ``torch.manual_seed(seed)``, one
    ``sampled_completions`` call of a ``TransformersSampler`` over all problems. With ``progress`` the results
    and the random state are saved after every chunk and a rerun continues after the last finished one, with
    the same result as an uninterrupted evaluation; the caller clears ``progress`` once it has stored the
    result. ``bar``: the description of a progress bar over the problems (greedy, then sampled; None: no bar)."""
    if not examples:
        raise ValueError("held_out_scores() got no examples")
    device = next(model.parameters()).device
    n = len(examples)
    settings = {"n": n, "samples": samples, "seed": seed, "batch_size": batch_size, "device": device.type}
    state = (progress.load(settings) if progress else None) or {"greedy": [], "sampled": []}
    greedy, sampled = state["greedy"], state["sampled"]
    shown = tqdm(total=(2 if samples else 1) * n, initial=len(greedy) + len(sampled), desc=bar, unit="problem",
                 disable=bar is None, leave=False)  # fmt: skip
    try:
        # greedy: one sequence per problem, a chunk of batch_size problems is one batch
        while len(greedy) < n:
            part = examples[len(greedy) : len(greedy) + batch_size]
            res = evaluate(model, tokenizer, part, template, max_new_tokens, verifier, batch_size=batch_size)
            greedy += [int(r["correct"]) for r in res.records]
            shown.update(len(part))
            if progress:
                progress.save(settings, {"greedy": greedy, "sampled": []})
        if samples:
            # a chunk of `step` problems is step * samples = lcm(batch_size, samples) sequences: whole batches
            step = batch_size // math.gcd(batch_size, samples)
            # seed None: the sampler draws from torch's RNG, seeded here (or restored) so that chunks continue it
            sampler = TransformersSampler(model, tokenizer, batch_size)
            params = SamplingParams(n=samples, max_new_tokens=max_new_tokens, temperature=1.0)
            if sampled:
                set_torch_rng_state(device, state["rng"])
            else:
                torch.manual_seed(seed)
            while len(sampled) < n:
                part = examples[len(sampled) : len(sampled) + step]
                prompts = [example_prompt(template, ex, tokenizer) for ex in part]
                comps = sampled_completions(sampler, prompts, params, images_of(tokenizer, part))
                counts = [0] * len(part)
                for r in score_completions(part, prompts, comps, verifier).records:
                    counts[r["index"]] += int(r["correct"])
                sampled += counts
                shown.update(len(part))
                if progress:
                    progress.save(
                        settings, {"greedy": greedy, "sampled": sampled, "rng": torch_rng_state(device)}
                    )
    finally:
        shown.close()
    return HeldOut(greedy=greedy, sampled=sampled if samples else None, samples=samples)
