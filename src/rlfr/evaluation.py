"""Held-out evaluation: greedy pass@1 with the same prompts and verifier as training.

``evaluate(model, tokenizer, examples, template, max_new_tokens, verifier)`` -> ``EvalResult`` with the
accuracy and one record per example (prompt, completion, extracted answer, correct). Under several
processes each rank evaluates a shard and the records are gathered, so every rank gets the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rlfr.data import Example
from rlfr.rollout import generate
from rlfr.templates import render_prompt
from rlfr.verifier import Verifier, extract_answer


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
    prompts = [render_prompt(template, examples[i].problem, tokenizer) for i in shard]
    records = []
    if shard:
        ro = generate(model, tokenizer, prompts, 1, max_new_tokens, greedy=True, batch_size=batch_size)
        scores = verifier.verify_batch(ro.completions, [examples[i].answer for i in shard])
        lens = ro.response_lengths.tolist()
        for i, p, c, s, n in zip(shard, prompts, ro.completions, scores, lens):
            ex = examples[i]
            records.append({
                "index": i, "id": ex.id, "prompt": p, "completion": c, "answer": ex.answer,
                "extracted": extract_answer(c), "correct": bool(s >= 1.0), "response_tokens": int(n),
            })
    if world > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    records.sort(key=lambda r: r["index"])
    acc = sum(r["correct"] for r in records) / len(records)
    mean_len = sum(r["response_tokens"] for r in records) / len(records)
    return EvalResult(accuracy=acc, n=len(records), records=records, mean_response_tokens=mean_len)
