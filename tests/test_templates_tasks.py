"""Prompt templates (with an offline tiny tokenizer) and the embedded reasoning-gym task."""

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from rlfr.data.tasks import arithmetic_steps, embedded_task
from rlfr.data.templates import SYSTEM_PROMPT, TEMPLATES, render_prompt
from rlfr.reward.verifier import Verifier

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
    assert TEMPLATES == ("chat", "qwen_math_box", "llama_box", "r1")


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
