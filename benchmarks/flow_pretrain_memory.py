"""Peak memory of one flow-pretraining step: the old path (the policy's whole forward, LM head and logits included,
over all of a step's sequences at once) against the new one (``rlfr flow-pretrain`` now: the forward stops after
the deepest hooked block, ``micro_batch_size`` sequences at a time with the flow's gradients accumulated).

Reproduce (CPU: a few minutes on 2 cores; on a GPU the same commands measure CUDA memory)::

    python benchmarks/flow_pretrain_memory.py            # the tables of docs/flow_pretraining.md
    python benchmarks/flow_pretrain_memory.py --e2e      # rlfr flow-pretrain itself: a 150k-vocabulary tiny Llama,
                                                         # 16 solutions of ~2,400 tokens, batch_size=16 micro_batch_size=2
    python benchmarks/flow_pretrain_memory.py --tiny     # seconds: checks the script

Each cell runs in a fresh subprocess, so that one cell's peak never shows in another's. It builds a tiny random-init
Llama (4 blocks, hidden 64, MLP 128, 4 heads, 2 key/value heads, tied embeddings, float32, SDPA attention) with the
cell's vocabulary, a flow (width 64, depth 2, AdamW) on the blocks at 25/50/75 % depth (``token_post``, shift 1,
``batch_mul`` 4), and ``batch`` sequences of a 64-token prompt and a ``tokens - 64``-token solution (random ids),
then runs one optimizer step of the flow. Reported: the peak (CPU: the child's RSS high-water mark,
``ru_maxrss``, glibc returning freed blocks at once: ``_child``; GPU: ``torch.cuda.max_memory_allocated``) and the
step's part of it (the peak minus what was held before the step: imports, model, flow). The tables:

1. vocabulary x sequence length, old path vs new, 2 sequences per step (the new path: 1 at a time);
2. ``batch_size`` at a fixed ``micro_batch_size`` (2), 1,024 tokens, 32k vocabulary: the new path stays flat;
3. ``micro_batch_size`` at ``batch_size`` 8: memory grows with the micro-batch.

An old-path cell whose logits alone (sequences x tokens x vocabulary x 4 bytes) exceed ``--max-gib`` is not run
on the CPU (shared machines): its row says "not run" with that size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
MiB = 1024**2
PROMPT = 64  # prompt tokens per sequence; the rest of a cell's tokens are solution tokens
VOCABS = (32_000, 152_064)  # Llama-2's / Qwen2.5's vocabulary sizes
LENGTHS = (1024, 4096, 8192)


def logits_bytes(batch: int, tokens: int, vocab: int) -> int:
    """What the old path's LM head alone allocates: (batch, tokens, vocab) float32 logits."""
    return batch * tokens * vocab * 4


def _rss() -> int:
    """This process's resident memory now, in bytes (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_cell(vocab: int, tokens: int, batch: int, micro: int, path: str, cpu: bool) -> dict:
    """One cell, in this process: build, one flow-pretraining step, peak memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlfr.flow import build_pairs, flow_matching_loss
    from rlfr.flow.field import FlowField
    from rlfr.policy.forward import model_inputs
    from rlfr.policy.latents import LatentTap
    from rlfr.policy.rollout import Solutions
    from rlfr.recipes.flow_pretrain import _latents, backward_step, chunks
    from rlfr.schema import FlowLatentsConfig

    cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=tokens, tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device).eval().requires_grad_(False)
    cfg = FlowLatentsConfig(batch_mul=4)
    tap = LatentTap(model, cfg.fractions)
    flow = FlowField(dim=64, depth=2).to(device)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    sol = Solutions(
        [torch.randint(0, vocab, (PROMPT,), generator=g).tolist() for _ in range(batch)],
        [torch.randint(0, vocab, (tokens - PROMPT,), generator=g).tolist() for _ in range(batch)],
    )
    tok = SimpleNamespace(
        pad_token_id=0, batch_decode=lambda ids, **_: [""] * len(ids)
    )  # pack() needs these two
    layer_values = tap.layer_values.to(device)
    before = torch.cuda.memory_allocated() if cuda else _rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if path == "old":  # as rlfr flow-pretrain ran before: one whole forward over the step's sequences
        packed = sol.pack(tok, list(range(batch))).to(device)
        with torch.no_grad():
            model(**model_inputs(packed.input_ids, packed.attention_mask), use_cache=False)
        lat = tap.latents()
        ctx = packed.attention_mask.bool()
        pairs = build_pairs(lat, layer_values, packed.response_mask, cfg.modes, cfg.shift, context_mask=ctx)
        loss = flow_matching_loss(flow, pairs, cfg.batch_mul)
        loss.backward()
    else:
        batches = [sol.pack(tok, c) for c in chunks(list(range(batch)), micro)]
        loss = backward_step(
            flow,
            lambda b: _latents(model, tap, b, device),
            batches,
            cfg,
            layer_values,
            None,
            torch.Tensor.backward,
        )
    opt.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "vocab": vocab, "tokens": tokens, "batch": batch, "micro": micro if path == "new" else batch, "path": path,
        "device": device.type, "peak_MiB": peak / MiB, "step_MiB": (peak - before) / MiB,
        "seconds": time.time() - t0, "loss": float(loss),
    }  # fmt: skip


def _child(args: list[str], malloc: bool = True) -> dict:
    """Run this script with ``args`` in a fresh process -> its RESULT. ``malloc``: glibc serves every block over
    64 KiB with its own mmap and returns it on free (``MALLOC_MMAP_THRESHOLD_``), so the RSS peak is what the
    tensors held at once; by default freed blocks stay in the heap and the peaks of alike cells drift by 10-20 %."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    if malloc:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"cell {args} failed:\n{proc.stderr[-3000:]}")


def cells(tiny: bool) -> list[tuple[str, int, int, int, int, str]]:
    """(table, vocab, tokens, batch, micro, path) of every cell; ``tiny``: two seconds-long cells."""
    if tiny:
        return [("vocabulary x length", 4096, 64, 2, 1, p) for p in ("old", "new")]
    out = [("vocabulary x length", v, n, 2, 1, p) for v in VOCABS for n in LENGTHS for p in ("old", "new")]
    out += [
        ("batch_size at micro_batch_size 2", VOCABS[0], 1024, b, 2, p)
        for b in (2, 8, 32)
        for p in ("old", "new")
    ]
    out += [("micro_batch_size at batch_size 8", VOCABS[0], 1024, 8, m, "new") for m in (1, 2, 4, 8)]
    return out


def table(max_gib: float, tiny: bool, cpu: bool) -> list[dict]:
    rows, current = [], None
    print(
        f"{'vocab':>8} {'tokens':>7} {'batch':>6} {'micro':>6} {'path':>5} {'peak MiB':>10} {'step MiB':>10} {'s':>6}"
    )
    for name, vocab, tokens, batch, micro, path in cells(tiny):
        if name != current:
            print(f"# {name}")
            current = name
        size = logits_bytes(batch, tokens, vocab)
        if path == "old" and size > max_gib * 1024**3 and (cpu or not torch.cuda.is_available()):
            row = {"vocab": vocab, "tokens": tokens, "batch": batch, "micro": batch, "path": path,
                   "not_run": f"logits alone {size / 1024**3:.1f} GiB > --max-gib {max_gib}"}  # fmt: skip
            print(f"{vocab:>8} {tokens:>7} {batch:>6} {batch:>6} {path:>5}   not run: {row['not_run']}")
        else:
            row = _child(
                ["--cell", str(vocab), str(tokens), str(batch), str(micro), path, *(["--cpu"] if cpu else [])]
            )
            print(f"{vocab:>8} {tokens:>7} {batch:>6} {row['micro']:>6} {path:>5} {row['peak_MiB']:>10.0f} "
                  f"{row['step_MiB']:>10.0f} {row['seconds']:>6.1f}")  # fmt: skip
        rows.append({"table": name, **row})
    return rows


def end_to_end(vocab: int, n: int, chars: int, batch: int, micro: int) -> dict:
    """``rlfr flow-pretrain`` on a tiny Llama with ``vocab`` entries (character-level tokenizer: ``chars``-token
    solutions), ``n`` rows, one step of ``batch`` in micro-batches of ``micro``, CPU; -> its peak RSS."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_run import make_tiny_model_dir

    root = Path(tempfile.mkdtemp(prefix="rlfr-fp-mem-"))
    model = make_tiny_model_dir(root / "model", vocab_size=vocab, max_position_embeddings=chars + 512)
    step = "Add the numbers, then carry the one: 37 + 48 = 85. "
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "solution": (step * (chars // len(step) + 1))[:chars]}
            for i in range(n)]  # fmt: skip
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"model.name_or_path={model}", f"data.train={root / 'data.jsonl'}", "data.eval=", "data.solution_field=solution",
        f"batch_size={batch}", f"micro_batch_size={micro}", "epochs=1", "heldout_fraction=0", "report_to=[]", "cpu=true",
        f"out_dir={root / 'out'}",
    ]  # fmt: skip
    try:
        result = _child(["--cli", *overrides], malloc=False)  # as a user runs it
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"vocab": vocab, "rows": n, "solution_tokens": chars, "batch_size": batch, "micro_batch_size": micro,
            "old_path_solution_logits_GiB": logits_bytes(batch, chars, vocab) / 1024**3, **result}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--max-gib", type=float, default=3.0, help="CPU: skip old-path cells with more logits than this"
    )
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even when a GPU is present")
    ap.add_argument("--tiny", action="store_true", help="tiny vocabularies and lengths: checks the script")
    ap.add_argument(
        "--e2e", action="store_true", help="rlfr flow-pretrain on 16 x 2,400 tokens, 150k vocabulary"
    )
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--cell", nargs=5, help=argparse.SUPPRESS)  # a child: vocab tokens batch micro path
    ap.add_argument("--cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # a child: rlfr flow-pretrain
    args = ap.parse_args()
    if args.cell:
        v, n, b, m, path = args.cell
        print("RESULT " + json.dumps(run_cell(int(v), int(n), int(b), int(m), path, args.cpu)), flush=True)
        return 0
    if args.cli is not None:
        from rlfr.cli import main as rlfr_main

        t0 = time.time()
        rc = rlfr_main(["flow-pretrain", *args.cli])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3
        print(
            "RESULT " + json.dumps({"rc": rc, "peak_rss_GiB": peak, "seconds": time.time() - t0}), flush=True
        )
        return 0
    if args.e2e:
        row = end_to_end(150_000, 16, 2400, 16, 2) if not args.tiny else end_to_end(150_000, 4, 200, 4, 2)
        print(json.dumps(row, indent=2))
        rows = [row]
    else:
        rows = table(args.max_gib, args.tiny, args.cpu)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
