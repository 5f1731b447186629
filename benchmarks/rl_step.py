"""RL step time: RLFR (flow scoring + shaping + online flow update) against plain RLVR, side by side.

Reproduce:
    .venv/bin/python benchmarks/rl_step.py                      # SmolLM2-135M, 8 prompts x 4, 64 new tokens
    .venv/bin/python benchmarks/rl_step.py --model runs/demo/sft/model --repeats 5 --soft-flow 1.0
    .venv/bin/python benchmarks/rl_step.py --engine vllm        # rollouts from the vLLM engine (docs/vllm.md)
    .venv/bin/python benchmarks/rl_step.py --random-init qwen2.5-1.5b --dtype bfloat16 --prompts 16 --n 8 \\
        --max-new-tokens 256                                    # a random model of that size, no hub access

Both trainers are built from the same model; each repeat runs one RLVR step and one RLFR step from the
same RNG seed (a tiny learning rate keeps the two policies, and so their rollouts, nearly identical),
alternating the order so that machine noise hits both. With ``--engine vllm`` both share one engine, and
the weights are pushed before every step (the sync time is reported apart from the rollout's). Prints the
medians per method of step time, rollout tokens/s, update time, flow time (scoring is inside the update;
``time/flow`` is the flow's training forward + backward), peak memory, and the FLOP floor of the update
ratio: 6 x flow_params x trained pairs x batch_mul (+ 2 x flow_params x scored pairs x timesteps) against
6 x policy_params x tokens, with the trained-pair fraction this run observed.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

# named sizes for --random-init: (architecture, hidden, intermediate, layers, heads, kv heads, tied embeddings)
SIZES = {
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, True),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, True),
}


def random_init_dir(name: str, tokenizer: str, dtype: str) -> str:
    """A random-init model of size ``name`` with ``tokenizer``'s vocabulary, saved to a temporary directory
    (so that transformers and vLLM load it by path like any model)."""
    import transformers as tf

    from rlfr.policy.loading import load_tokenizer, resolve_model_path

    arch, hidden, inter, layers, heads, kv, tied = SIZES[name]
    tok = load_tokenizer(str(resolve_model_path(tokenizer)))
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[arch]
    config = cls(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out = Path(tempfile.mkdtemp(prefix=f"rlfr-{name}-"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def build(method: str, args, model: str, engine: str):
    from rlfr.config import load_config
    from rlfr.recipes.train import build_components
    from rlfr.runtime.env import make_accelerator
    from rlfr.schema import TrainConfig

    cfg = load_config(
        TrainConfig,
        overrides=[
            f"method={method}",
            f"model.name_or_path={model}",
            f"model.dtype={args.dtype}",
            "data.train_size=256",
            "data.eval_size=8",
            f"rollout.prompts_per_step={args.prompts}",
            f"rollout.num_generations={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.batch_size={args.prompts * args.n}",
            f"rollout.engine={engine}",
            f"rollout.vllm_memory_fraction={args.vllm_memory_fraction}",
            f"policy.micro_batch_size={args.micro_batch}",
            "policy.lr=1e-9",
            f"flow.soft_flow={args.soft_flow}",
            *(["flow.init=random"] if method == "rlfr" else []),  # timing only: a fresh flow costs the same
            f"steps={args.repeats + 1}",
            "out_dir=/tmp/rlfr-bench",
            "report_to=[]",
        ],
    )
    return build_components(cfg, make_accelerator(cpu=args.cpu))


def n_params(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def peak_memory_gib(device) -> float:
    """CUDA: max allocated since the last reset; CPU: the process's max resident set (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-init", choices=sorted(SIZES), help="a random-init model of this size instead")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct", help="--random-init: tokenizer to use")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--engine", default="hf", choices=("hf", "vllm"), help="rollout engine")
    ap.add_argument("--vllm-memory-fraction", type=float, default=0.3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method (after one warm-up)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument(
        "--soft-flow",
        type=float,
        default=0.0,
        help="flow-loss weight of wrong rollouts: 0 = published (flow trained on correct ones only), 1 = worst case",
    )
    args = ap.parse_args()

    from rlfr.rl.step import rl_step

    model = random_init_dir(args.random_init, args.tokenizer, args.dtype) if args.random_init else args.model
    t0 = time.perf_counter()
    trainers = {"rlvr": build("rlvr", args, model, args.engine)}
    t_build = time.perf_counter() - t0
    trainers["rlfr"] = build("rlfr", args, model, "hf")
    engine = trainers["rlvr"][0].sampler if args.engine == "vllm" else None
    if engine is not None:  # one engine for both (two would hold the memory twice)
        trainers["rlfr"][0].sampler = engine
    device = trainers["rlvr"][0].acc.device
    keys = (
        "step",
        "rollout",
        "sync",
        "tps",
        "update",
        "flow",
        "len",
        "mem",
        "tokens",
        "pairs",
        "trained_frac",
    )
    times: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in trainers}
    for rep in range(args.repeats + 1):
        order = ("rlvr", "rlfr") if rep % 2 == 0 else ("rlfr", "rlvr")
        for m in order:
            c, data = trainers[m]
            if engine is not None:
                engine.version = None  # the other trainer's weights are in it: push this one's
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            idx = list(range(rep * args.prompts, (rep + 1) * args.prompts))
            torch.manual_seed(1000 + rep)
            t = time.perf_counter()
            stats = rl_step(c, rep, [data.train[i] for i in idx], [data.prompts[i] for i in idx])
            wall = time.perf_counter() - t
            if rep == 0:
                continue  # warm-up
            d = times[m]
            d["step"].append(wall)
            d["rollout"].append(float(stats["time/rollout"]))
            d["sync"].append(float(stats.get("time/weight_sync", 0.0)))
            d["tps"].append(float(stats["rollout_tokens_per_s"]))
            d["update"].append(float(stats["time/update"]))
            d["flow"].append(float(stats.get("time/flow", 0.0)))
            d["len"].append(float(stats["response_len"]))
            d["mem"].append(peak_memory_gib(device))
            d["tokens"].append(float(stats["update/tokens"]))
            d["pairs"].append(float(stats.get("flow/pairs", 0.0)))
            d["trained_frac"].append(float(stats.get("flow/trained_pair_frac", 0.0)))
    for c, _ in trainers.values():
        c.reward.verifier.close()
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in times.items()}
    name = f"random-init {args.random_init}" if args.random_init else args.model
    print(
        f"\nmodel {name} ({args.dtype}), engine {args.engine}, device {device}, {args.prompts} prompts x {args.n} "
        f"samples, {args.max_new_tokens} new tokens, soft_flow {args.soft_flow}, median of {args.repeats} steps per "
        f"method (torch threads: {torch.get_num_threads()}); building one trainer took {t_build:.1f} s"
    )
    mem = "peak GiB" if device.type == "cuda" else "max RSS GiB"
    print(
        f"{'method':8s} {'step (s)':>9s} {'rollout (s)':>11s} {'sync (s)':>9s} {'rollout tok/s':>14s} "
        f"{'update (s)':>11s} {'flow (s)':>9s} {'resp len':>9s} {mem:>12s}"
    )
    for m in ("rlvr", "rlfr"):
        d = med[m]
        print(
            f"{m:8s} {d['step']:9.2f} {d['rollout']:11.2f} {d['sync']:9.2f} {d['tps']:14.1f} {d['update']:11.2f} "
            f"{d['flow']:9.2f} {d['len']:9.1f} {d['mem']:12.2f}"
        )
    upd = med["rlfr"]["update"] / med["rlvr"]["update"]
    print(f"ratio rlfr/rlvr: step {med['rlfr']['step'] / med['rlvr']['step']:.3f}, update {upd:.3f}")
    c = trainers["rlfr"][0]
    p_policy = n_params(c.acc.unwrap_model(c.policy))
    p_flow = n_params(c.acc.unwrap_model(c.flow.field))
    f = c.cfg.flow
    pairs, frac, tokens = med["rlfr"]["pairs"], med["rlfr"]["trained_frac"], med["rlfr"]["tokens"]
    policy_flops = 6 * p_policy * tokens
    train_flops = 6 * p_flow * pairs * frac * f.batch_mul
    score_flops = 2 * p_flow * pairs * len(f.reward.timesteps)
    floor = (policy_flops + train_flops + score_flops) / policy_flops
    print(
        f"FLOP floor of the update ratio: {floor:.3f} (policy {p_policy / 1e6:.1f}M params x {tokens:.0f} tokens; "
        f"flow {p_flow / 1e6:.1f}M params x {pairs:.0f} pairs, trained fraction {frac:.2f} x batch_mul "
        f"{f.batch_mul}); measured / floor {upd / floor:.3f}"
    )


if __name__ == "__main__":
    main()
