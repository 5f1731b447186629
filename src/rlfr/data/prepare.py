"""Flow-pretraining input from a dataset of expert solutions (``rlfr data prepare``).

The authors pretrain their flows on expert solutions rendered with LLaMA-Factory's templates, cut at
``cutoff_len: 8192`` tokens, with no held-out split (docs/RLFR_METHOD.md §9). ``prepare_flow_data`` does the same ahead of
``rlfr flow-pretrain``, so the cut is visible and counted before any GPU time is spent:

- every example is measured as flow pretraining will encode it: the prompt under ``template`` (with the row's
  system turn) followed by the solution and the template's end of turn (``rlfr.data.templates.response_end``;
  the EOS token for the others), ``rlfr.policy.rollout.encode_solutions``;
- a sequence longer than ``max_length`` tokens is truncated (its solution cut, as LLaMA-Factory's ``cutoff_len``
  does; the cut solution is decoded back to text and re-measured, so it fits as flow pretraining encodes it) or
  dropped (``overlong``); a prompt that alone leaves no room for a solution token is dropped either way;
- ``heldout_fraction`` of the kept rows (a seeded draw) go to a held-out split.

The rows written are chat rows, ``{"id", "messages": [system?, user, assistant]}``: the system turn travels with
its row (an empty one too, meaning "none"), and ``rlfr flow-pretrain data.prompt_field=messages
data.template=<the same template>`` reads them back to the very token sequences measured here.

Contract: ``prepare_flow_data(examples, template, tokenizer, max_length, overlong, heldout_fraction, seed) ->
Prepared`` (rows per split and ``PrepareStats``); ``write_prepared(prepared, out_dir, fmt)`` writes
``train.jsonl`` (+ ``heldout.jsonl``) or a ``DatasetDict`` with ``save_to_disk``, and returns what it wrote.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from rlfr.data.templates import render_prompt, response_end

PERCENTILES = (50, 90, 99, 100)


@dataclass
class PrepareStats:
    rows: int = 0  # examples read
    kept: int = 0  # rows written (train + held-out)
    truncated: int = 0  # rows whose solution was cut to fit max_length
    dropped: int = 0  # rows left out for their length
    heldout: int = 0
    lengths: dict[int, int] = field(default_factory=dict)  # percentile -> tokens, before any cut

    def lines(self) -> list[str]:
        pct = ", ".join(f"p{p} {n:,}" if p < 100 else f"max {n:,}" for p, n in self.lengths.items())
        return [
            f"rows: {self.rows:,} read, {self.kept:,} kept ({self.kept - self.heldout:,} train, {self.heldout:,} "
            f"held out), {self.truncated:,} truncated, {self.dropped:,} dropped",
            f"sequence length in tokens (prompt + solution + end of turn, before the cut): {pct}",
        ]


@dataclass
class Prepared:
    splits: dict[str, list[dict]]
    stats: PrepareStats


def percentile(sorted_values: list[int], p: int) -> int:
    """The nearest-rank ``p``-th percentile of an ascending list (p100 = the largest)."""
    rank = max(1, -(-p * len(sorted_values) // 100))  # ceil(p * n / 100)
    return sorted_values[rank - 1]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _response_ids(tokenizer, solution: str, end: str | None) -> list[int]:
    """The response ids flow pretraining trains on: ``encode_solutions``'s rule."""
    if end is not None:
        return _encode(tokenizer, solution + end)
    return _encode(tokenizer, solution) + [tokenizer.eos_token_id]


def _fit(tokenizer, solution: str, budget: int, end: str | None) -> str | None:
    """The longest token prefix of ``solution`` whose response (with the end of turn) takes at most ``budget``
    tokens; None if not even one solution token fits."""
    ids = _encode(tokenizer, solution)
    keep = min(len(ids), budget - (1 if end is None else len(_encode(tokenizer, end))))
    while keep > 0:
        text = tokenizer.decode(ids[:keep])
        if len(_response_ids(tokenizer, text, end)) <= budget:
            return text
        keep -= 1  # a cut inside a merge can re-encode longer: step back until it fits
    return None


def chat_row(example, solution: str) -> dict:
    system = [{"role": "system", "content": example.system}] if example.system is not None else []
    turns = [{"role": "user", "content": example.problem}, {"role": "assistant", "content": solution}]
    return {"id": example.id, "messages": system + turns}


def prepare_flow_data(
    examples, template: str, tokenizer, max_length: int, overlong: str = "truncate",
    heldout_fraction: float = 0.0, seed: int = 0,
) -> Prepared:  # fmt: skip
    """Rows for flow pretraining (module docstring)."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be truncate or drop, got {overlong!r}")
    end = response_end(template)
    stats, rows, lengths = PrepareStats(rows=len(examples)), [], []
    for ex in examples:
        prompt = _encode(tokenizer, render_prompt(template, ex.problem, tokenizer, system=ex.system))
        response = _response_ids(tokenizer, ex.solution, end)
        lengths.append(len(prompt) + len(response))
        solution = ex.solution
        if lengths[-1] > max_length:
            cut = (
                _fit(tokenizer, ex.solution, max_length - len(prompt), end)
                if overlong == "truncate"
                else None
            )
            if cut is None:
                stats.dropped += 1
                continue
            stats.truncated, solution = stats.truncated + 1, cut
        rows.append(chat_row(ex, solution))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = int(round(heldout_fraction * len(rows)))
    held = set(order[:n_held])
    splits = {"train": [r for i, r in enumerate(rows) if i not in held]}
    if n_held:
        splits["heldout"] = [r for i, r in enumerate(rows) if i in held]
    stats.kept, stats.heldout = len(rows), n_held
    ordered = sorted(lengths)
    stats.lengths = {p: percentile(ordered, p) for p in PERCENTILES} if ordered else {}
    return Prepared(splits, stats)


def write_prepared(prepared: Prepared, out_dir: str | Path, fmt: str = "jsonl") -> list[Path]:
    """``out_dir/<split>.jsonl`` per split, or (``fmt="dataset"``) a ``DatasetDict`` saved in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "dataset":
        import datasets  # lazy: datasets takes a second to import; the jsonl output does without it

        dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in prepared.splits.items()})
        dd.save_to_disk(str(out))
        return [out]
    paths = []
    for split, rows in prepared.splits.items():
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths.append(path)
    return paths
