"""Tests for reward_models/ (CPU, no network, < 60 s)."""

from __future__ import annotations

import json
import math
import pickle
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from reward_models import (
    RewardFunctionError,
    SequenceClassifierReward,
    call_reward,
    extract_gsm8k_answer,
    format_reward,
    gsm8k_answer_reward,
    keyword_reward,
    length_reward,
    train_sentiment_model,
    weighted_sum,
)
from reward_models.train_sentiment import build_word_tokenizer, read_tsv

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GSM8K_TEST = SHARED / "data" / "gsm8k" / "test.jsonl"
SST2 = SHARED / "data" / "sst2"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent (expected ../shared/data next to the repo)")
    return path


# --------------------------------------------------------------------------- GSM8K


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    with open(_need(GSM8K_TEST), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_gsm8k_gold_answers_all_parse(gsm8k_rows):
    for row in gsm8k_rows:
        gold = extract_gsm8k_answer(row["answer"])
        raw = row["answer"].rsplit("####", 1)[1].strip()
        assert gold is not None, row["answer"]
        assert gold == extract_gsm8k_answer(raw)
        # the canonical form is the raw number without commas/$ and trailing zeros
        assert float(gold) == float(raw.replace(",", "").replace("$", "").rstrip("."))


def test_gsm8k_reward_on_real_lines(gsm8k_rows):
    rows = gsm8k_rows[:50]
    prompts = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    # the gold solution scored against itself
    assert gsm8k_answer_reward(prompts, answers, answer=answers) == [1.0] * len(rows)
    # "the answer is N" phrasing, with $ and thousands separators, also scores 1
    golds = [extract_gsm8k_answer(a) for a in answers]
    phrased = [
        f"Let me think.\nSo the answer is ${int(Decimal(g)):,}." if Decimal(g) == int(Decimal(g)) else f"It is {g}."
        for g in golds
    ]
    assert gsm8k_answer_reward(prompts, phrased, answer=answers) == [1.0] * len(rows)
    # a wrong number gives 0
    wrong = [a.rsplit("####", 1)[0] + f"#### {Decimal(g) + 1}" for a, g in zip(answers, golds)]
    assert gsm8k_answer_reward(prompts, wrong, answer=answers) == [0.0] * len(rows)
    # the first test line: Janet's ducks, answer 18
    assert golds[0] == "18"


def test_gsm8k_extraction_edge_cases():
    cases = {
        "#### 1,234": "1234",
        "The total is $1,000.00.": "1000",
        "16 - 3 - 4 = 9 eggs": "9",
        "16-3-4=9": "9",
        "she lost -5 dollars": "-5",
        "It is 3.50. Done": "3.5",
        "x = 72.": "72",
        "work #### 18\nthen I wrote 7 more": "18",  # number after #### wins
        "no digits here": None,
        "####   ": None,
    }
    for text, want in cases.items():
        assert extract_gsm8k_answer(text) == want, text
    r = gsm8k_answer_reward(
        ["q"] * 4,
        ["The answer is 18.", "#### $18", "I get 17 then 18, final 17", ""],
        answer=["#### 18"] * 4,
        completion_ids=[[1]] * 4,
        trainer_state=None,
    )
    assert r == [1.0, 1.0, 0.0, 0.0]
    # conversational completions and a gold without a number
    conv = [[{"role": "assistant", "content": "so #### 5"}]]
    assert gsm8k_answer_reward([[{"role": "user", "content": "q"}]], conv, answer=["#### 5"]) == [1.0]
    assert gsm8k_answer_reward(["q"], ["5"], answer=["no gold"]) == [None]
    assert gsm8k_answer_reward.__name__ == "gsm8k_answer_reward"


# --------------------------------------------------------------------------- other rule-based rewards


def test_length_reward():
    f = length_reward(target_words=4)
    out = f(["p"] * 4, ["a b c d", "a b", "", "a b c d e f g h i j k l"], trainer_state=None)
    assert out == [0.0, -0.5, -1.0, -2.0]
    assert f.__name__ == "length_reward_4w"
    clipped = length_reward(target_words=4, min_reward=-1.0)
    assert clipped(["p"], ["a b c d e f g h i j k l"]) == [-1.0]
    chars = length_reward(10, unit="chars")
    assert chars(["p"], ["x" * 15]) == [-0.5]
    with pytest.raises(ValueError):
        length_reward(0)


def test_keyword_reward():
    f = keyword_reward(["good", "great fun"], ["bad"])
    out = f(
        ["p"] * 6,
        [
            "Good movie, GOOD acting.",  # 2 positive, case-insensitive
            "goodness, not good-ish",  # "goodness" is not a whole-word hit; "good-ish" → "good" is
            "bad bad good",
            "great fun but bad",  # phrase counted once
            "nothing here",
            "badly goodly",
        ],
    )
    assert out == [1.0, 1.0, pytest.approx(-1 / 3), 0.0, 0.0, 0.0]
    assert f.__name__ == "keyword_reward"
    assert f.counts("Good good bad") == (2, 1)
    dens = keyword_reward(["good"], normalize="words", name="kw_density")
    assert dens(["p"], ["good good x y"]) == [0.5]
    assert dens.__name__ == "kw_density"
    raw = keyword_reward(["good"], ["bad"], normalize="none", case_sensitive=True)
    assert raw(["p"], ["good Good bad bad bad"]) == [-2.0]
    with pytest.raises(TypeError):
        keyword_reward("good")  # a bare string is a mistake, not a list of characters


def test_format_reward():
    f = format_reward(r"<think>.*?</think>\s*<answer>.*?</answer>")
    comps = [
        "<think>a\nb</think>\n<answer>4</answer>\n",
        "<think>a</think> <answer>4</answer> trailing",
        "prefix <think>a</think><answer>4</answer>",
        "",
    ]
    assert f(["p"] * 4, comps) == [1.0, 0.0, 0.0, 0.0]
    partial = format_reward(r"<answer>\d+</answer>", mode="search")
    assert partial(["p"] * 4, comps) == [1.0, 1.0, 1.0, 0.0]
    assert f.__name__ == "format_reward"
    g = pickle.loads(pickle.dumps(f))
    assert g(["p"] * 4, comps) == [1.0, 0.0, 0.0, 0.0]


def test_factories_are_picklable():
    for f in (length_reward(5), keyword_reward(["a"]), weighted_sum([length_reward(5)], [2.0])):
        g = pickle.loads(pickle.dumps(f))
        assert g.__name__ == f.__name__
        assert g(["p"], ["a b"]) == f(["p"], ["a b"])


# --------------------------------------------------------------------------- combine


def _const(value, name):
    def f(prompts, completions, **kw):
        return [value] * len(completions)

    f.__name__ = name
    return f


def test_weighted_sum():
    length = length_reward(2)
    kw = keyword_reward(["good"])
    ws = weighted_sum([length, kw], [0.5, 2.0])
    comps = ["good day", "bad", "good good good good"]
    out = ws(["p"] * 3, comps, trainer_state=None)
    want = [0.5 * l + 2.0 * k for l, k in zip(length(["p"] * 3, comps), kw(["p"] * 3, comps))]
    assert out == pytest.approx(want)
    assert ws.__name__ == "0.5*length_reward_2w+2*keyword_reward"
    # None handling
    maybe = _const(None, "maybe")
    one = _const(1.0, "one")
    assert weighted_sum([one, maybe], [3.0, 1.0])(["p"], ["c"]) == [3.0]
    assert weighted_sum([maybe, maybe])(["p"], ["c"]) == [None]
    assert weighted_sum([one, maybe], missing="propagate")(["p"], ["c"]) == [None]
    assert weighted_sum([maybe], missing="zero")(["p"], ["c"]) == [0.0]
    # extra columns reach the components
    gs = weighted_sum([gsm8k_answer_reward, one], [1.0, 0.1])
    assert gs(["q", "q"], ["#### 3", "4"], answer=["#### 3", "#### 3"]) == pytest.approx([1.1, 0.1])
    with pytest.raises(ValueError):
        weighted_sum([one, maybe], [1.0])
    with pytest.raises(ValueError):
        weighted_sum([one], [float("nan")])


def test_call_reward_names_function_and_sample():
    def picky_reward(prompts, completions, **kw):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on ""

    prompts = ["p0", "p1", "p2", "p3"]
    comps = ["ok", "fine", "", "also ok"]
    with pytest.raises(RewardFunctionError) as ei:
        call_reward(picky_reward, prompts, comps, completion_ids=[[0]] * 4, trainer_state=object())
    msg = str(ei.value)
    assert "picky_reward" in msg and "sample 2" in msg and "'p2'" in msg and "ZeroDivisionError" in msg
    assert ei.value.index == 2 and ei.value.func_name == "picky_reward" and ei.value.completion == ""
    assert isinstance(ei.value.__cause__, ZeroDivisionError)

    # per-sample columns are sliced on the retry, so the culprit is found through them
    def needs_answer(prompts, completions, answer, **kw):
        return [float(int(a)) for a in answer]

    with pytest.raises(RewardFunctionError, match=r"(?s)needs_answer.*sample 1") as ei:
        call_reward(needs_answer, ["a", "b", "c"], ["x", "y", "z"], answer=["1", "two", "3"])
    assert ei.value.completion == "y"

    # a batch-only failure still names the function
    def batch_only(prompts, completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [0.0]

    with pytest.raises(RewardFunctionError, match=r"(?s)batch_only.*batch too big") as ei:
        call_reward(batch_only, ["a", "b"], ["x", "y"])
    assert ei.value.index is None

    # errors inside weighted_sum name the component
    with pytest.raises(RewardFunctionError, match="picky_reward"):
        weighted_sum([length_reward(3), picky_reward])(prompts, comps)


def test_call_reward_validates_output():
    assert call_reward(_const(1, "ints"), ["p"], ["c"]) == [1.0]
    assert call_reward(_const(None, "nones"), ["p"] * 2, ["c"] * 2) == [None, None]
    assert call_reward(_const(torch.tensor(0.5), "tensor_scalars"), ["p"], ["c"]) == [0.5]

    def nan_at_1(prompts, completions, **kw):
        return [0.0, float("nan"), 1.0]

    with pytest.raises(RewardFunctionError, match=r"(?s)nan_at_1.*nan.*sample 1") as ei:
        call_reward(nan_at_1, ["a", "b", "c"], ["x", "y", "z"])
    assert ei.value.index == 1

    def too_short(prompts, completions, **kw):
        return [0.0]

    with pytest.raises(RewardFunctionError, match=r"(?s)too_short.*returned 1 rewards for 3"):
        call_reward(too_short, ["a"] * 3, ["x"] * 3)

    def not_a_list(prompts, completions, **kw):
        return 1.0

    with pytest.raises(RewardFunctionError, match=r"(?s)not_a_list.*float"):
        call_reward(not_a_list, ["a"], ["x"])

    def strings(prompts, completions, **kw):
        return ["1.0"]

    with pytest.raises(RewardFunctionError, match=r"(?s)strings.*str.*sample 0"):
        call_reward(strings, ["a"], ["x"])


# --------------------------------------------------------------------------- HF classifier


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    texts = ["a great movie", "a bad film", "i loved it", "boring and dull", "what fun"]
    tok = build_word_tokenizer(texts, min_frequency=1, max_length=32)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model = BertForSequenceClassification(config)
    d = tmp_path_factory.mktemp("tiny_sst_classifier")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_sequence_classifier_reward(tiny_classifier_dir):
    prompts = ["p"] * 5
    comps = ["a great movie", "a bad film", "", "unseen words only", "i loved it , what fun " * 20]
    r = SequenceClassifierReward(tiny_classifier_dir, label=1, batch_size=2, local_files_only=True)
    out = r(prompts, comps, completion_ids=[[0]] * 5, trainer_state=None)
    assert len(out) == 5 and all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in out)
    assert r.__name__ == f"{tiny_classifier_dir.name}_positive"
    assert not r.model.training

    by_name = SequenceClassifierReward(tiny_classifier_dir, label="positive", batch_size=3, local_files_only=True)
    assert by_name.label_index == 1
    assert by_name(prompts, comps) == pytest.approx(out, abs=1e-6)  # batching/order do not matter
    neg = SequenceClassifierReward(tiny_classifier_dir, label="NEGATIVE", local_files_only=True)
    assert [a + b for a, b in zip(out, neg(prompts, comps))] == pytest.approx([1.0] * 5, abs=1e-5)

    logprob = SequenceClassifierReward(tiny_classifier_dir, label="positive", kind="logprob", local_files_only=True)
    assert [math.exp(x) for x in logprob(prompts, comps)] == pytest.approx(out, abs=1e-5)
    assert logprob.__name__.endswith("_positive_logprob")
    logit = SequenceClassifierReward(tiny_classifier_dir, kind="logit", local_files_only=True)
    assert len(logit(prompts, comps)) == 5

    pc = SequenceClassifierReward(tiny_classifier_dir, text="prompt+completion", separator=" ", local_files_only=True)
    assert pc.texts(["a great"], ["movie"]) == ["a great movie"]
    assert pc(["a great"], ["movie"]) == pytest.approx(r(["x"], ["a great movie"]), abs=1e-6)

    # it is a valid reward for call_reward / weighted_sum
    assert call_reward(r, prompts, comps) == pytest.approx(out)
    with pytest.raises(ValueError, match="label2id"):
        SequenceClassifierReward(tiny_classifier_dir, label="neutral", local_files_only=True)
    with pytest.raises(ValueError):
        SequenceClassifierReward(tiny_classifier_dir, label=2, local_files_only=True)


# --------------------------------------------------------------------------- sentiment training


def _subset(src: Path, dst: Path, n: int) -> Path:
    lines = _need(src).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


def test_train_sentiment_model_small_and_cache(tmp_path):
    train = _subset(SST2 / "train.tsv", tmp_path / "train.tsv", 300)
    dev = _subset(SST2 / "dev.tsv", tmp_path / "dev.tsv", 100)
    out = tmp_path / "rm"
    m = train_sentiment_model(train, dev, out, epochs=1, seed=3, progress=False)
    assert not m["cached"]
    assert m["train_size"] == 300 and m["dev_size"] == 100 and m["seed"] == 3
    assert 0.0 <= m["dev_accuracy"] <= 1.0
    on_disk = json.loads((out / "metrics.json").read_text())
    for k in ("dev_accuracy", "train_size", "seed", "train_time_s"):
        assert on_disk[k] == m[k]

    # same arguments → reused, nothing retrained
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = train_sentiment_model(train, dev, out, epochs=1, seed=3, progress=False)
    assert again["cached"] and again["dev_accuracy"] == m["dev_accuracy"]
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    # the checkpoint loads as a reward model, with label names
    rm = SequenceClassifierReward(out, label="positive", local_files_only=True)
    scores = rm(["p", "p"], ["a wonderful , moving film", "a dull , boring mess"])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)

    # determinism: a fresh run with the same seed gives the same metrics and logits
    m2 = train_sentiment_model(train, dev, tmp_path / "rm2", epochs=1, seed=3, progress=False)
    assert m2["dev_accuracy"] == m["dev_accuracy"]
    rm2 = SequenceClassifierReward(tmp_path / "rm2", label="positive", local_files_only=True)
    assert rm2(["p", "p"], ["a wonderful , moving film", "a dull , boring mess"]) == pytest.approx(scores, abs=1e-6)

    # different arguments → retrained in place
    m3 = train_sentiment_model(train, dev, out, epochs=1, seed=4, max_steps=3, progress=False)
    assert not m3["cached"] and m3["steps"] == 3
    assert json.loads((out / "metrics.json").read_text())["seed"] == 4


def test_read_tsv_errors(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("fine text\t1\nno label here\n")
    with pytest.raises(ValueError, match=r"(?s)bad.tsv:2"):
        read_tsv(p)
    with pytest.raises(TypeError, match="unknown training option"):
        train_sentiment_model(p, p, tmp_path / "x", bogus=1)


def test_train_sentiment_cli(tmp_path, capsys):
    from reward_models.train_sentiment import main

    train = _subset(SST2 / "train.tsv", tmp_path / "train.tsv", 120)
    dev = _subset(SST2 / "dev.tsv", tmp_path / "dev.tsv", 40)
    argv = ["--train", str(train), "--dev", str(dev), "--out", str(tmp_path / "cli"), "--epochs", "1",
            "--seed", "1", "--max-steps", "2", "--no-progress"]
    m = main(argv)
    assert m["steps"] == 2 and (tmp_path / "cli" / "metrics.json").is_file()
    assert "dev accuracy" in capsys.readouterr().out
    assert main(argv)["cached"]


def test_sequence_classifier_reward_single_logit_without_pad(tmp_path):
    """A GPT-2 style preference reward model: one logit, tokenizer without a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", "good", "bad", "movie", "a"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")
    assert tok.pad_token is None
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=1)
    cfg.pad_token_id = None
    GPT2ForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    logit = SequenceClassifierReward(tmp_path, label=0, kind="logit", local_files_only=True)
    prob = SequenceClassifierReward(tmp_path, label=0, kind="prob", local_files_only=True)
    comps = ["a good movie", "bad", "a a a a a bad movie"]
    x, p = logit(["p"] * 3, comps), prob(["p"] * 3, comps)
    assert p == pytest.approx([1 / (1 + math.exp(-v)) for v in x], abs=1e-6)
    # padding does not change a row's score (the last real token is found via pad_token_id)
    assert [logit(["p"], [c])[0] for c in comps] == pytest.approx(x, abs=1e-5)


# --------------------------------------------------------------------------- degenerate completions

_WORDS = ["<pad>", "<eos>", "<unk>", "a", "good", "great", "movie", "bad", "film", "fun", "i", "loved", "it"]


def _word_tokenizer(specials: bool = True, padding_side: str = "right"):
    """A word-level ``PreTrainedTokenizerFast`` that adds no special tokens (``""`` → zero tokens).

    ``specials``: declare ``<pad>``/``<eos>``/``<unk>`` as its pad/eos/unk tokens; otherwise the
    tokenizer has no special tokens at all (unknown words still map to ``<unk>``'s id).
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>") if specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=t, padding_side=padding_side, **kw)


def _tiny_gpt2(pad_token_id=None, n_positions: int = 16, seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(_WORDS), n_positions=n_positions, n_embd=16, n_layer=2, n_head=2, num_labels=1,
        bos_token_id=1, eos_token_id=1, pad_token_id=pad_token_id,
    )  # fmt: skip
    return GPT2ForSequenceClassification(cfg).eval()


def _tiny_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=len(_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=18, pad_token_id=0, bos_token_id=1, eos_token_id=1, type_vocab_size=1, num_labels=2,
    )  # fmt: skip
    return RobertaForSequenceClassification(cfg).eval()


_LONG = "a good movie , i loved it . " * 3000  # ~ 21k words: far past every classifier's positions
_DEGENERATE = {
    "empty": "",
    "whitespace": "   \n\t  ",
    "eos_text": "<eos>",
    "pad_text": "<pad>",
    "eos_run": "<eos><eos> <eos>",
    "pad_then_eos": "<pad> <eos>",
    "gpt2_eos_text": "<|endoftext|>",
    "bert_pad_text": "[PAD]",
    "bert_sep_text": "[SEP] [CLS]",
    "max_length": _LONG,
    "non_ascii": "日本語 ✓ café",
    "empty_conversation": [],
    "empty_message": [{"role": "assistant", "content": ""}],
}


@pytest.fixture(scope="module")
def degenerate_rewards(tiny_classifier_dir) -> dict:
    gpt2 = SequenceClassifierReward(_tiny_gpt2(), tokenizer=_word_tokenizer(), label=0, batch_size=2, name="gpt2_rm")
    bert = SequenceClassifierReward(tiny_classifier_dir, label="positive", batch_size=2, local_files_only=True)
    roberta = SequenceClassifierReward(
        _tiny_roberta(), tokenizer=_word_tokenizer(), label=1, kind="logprob", batch_size=3, name="roberta_rm"
    )
    rules = [
        gsm8k_answer_reward,
        length_reward(4),
        length_reward(20, unit="chars", min_reward=-1.0),
        keyword_reward(["good", "loved"], ["bad"]),
        keyword_reward(["good"], normalize="words"),
        format_reward(r"<answer>.*?</answer>", mode="search"),
    ]
    return {
        "gsm8k": gsm8k_answer_reward,
        "length_words": rules[1],
        "length_chars": rules[2],
        "keywords": rules[3],
        "keyword_density": rules[4],
        "format": rules[5],
        "gpt2_classifier": gpt2,
        "bert_classifier": bert,
        "roberta_classifier": roberta,
        "weighted_sum": weighted_sum(rules + [gpt2], [1.0, 0.5, 0.5, 1.0, 1.0, 0.2, 2.0]),
    }


_REWARD_NAMES = [
    "gsm8k", "length_words", "length_chars", "keywords", "keyword_density", "format",
    "gpt2_classifier", "bert_classifier", "roberta_classifier", "weighted_sum",
]  # fmt: skip


@pytest.mark.parametrize("reward", _REWARD_NAMES)
@pytest.mark.parametrize("case", list(_DEGENERATE))
def test_reward_defined_on_degenerate_completion(degenerate_rewards, reward, case):
    """Every reward returns finite floats for degenerate completions, alone, several in one
    batch and mixed with ordinary ones, and the values do not depend on the batch."""
    f = degenerate_rewards[reward]
    deg = _DEGENERATE[case]
    comps = [deg, deg, "a good movie", deg, "bad film #### 3", deg]
    n = len(comps)
    out = call_reward(f, ["p"] * n, comps, answer=["#### 3"] * n, trainer_state=None)
    assert len(out) == n and all(isinstance(x, float) and math.isfinite(x) for x in out), out
    # same values one at a time (every degenerate copy gets the same score)
    alone = [call_reward(f, ["p"], [c], answer=["#### 3"])[0] for c in comps]
    assert out == pytest.approx(alone, abs=1e-5)
    assert out[0] == pytest.approx(out[1], abs=1e-5) and out[0] == pytest.approx(out[3], abs=1e-5)


@pytest.mark.parametrize("reward", _REWARD_NAMES)
def test_reward_empty_batch(degenerate_rewards, reward):
    assert call_reward(degenerate_rewards[reward], [], [], answer=[]) == []


def test_classifier_empty_completions_share_a_batch():
    """The reported crash: GPT-2 single-logit classifier, batch_size=2, sorted texts put the
    two empty completions in one batch of zero tokens."""
    r = SequenceClassifierReward(_tiny_gpt2(), tokenizer=_word_tokenizer(), label=0, batch_size=2)
    out = call_reward(r, ["p"] * 3, ["", "", "a good movie"])
    assert out == pytest.approx([r.score_texts([t])[0] for t in ["", "", "a good movie"]], abs=1e-5)
    # documented: a text with no tokens is scored as the one-token input [eos]
    assert r.empty_token_id == r.tokenizer.eos_token_id == 1
    assert out[0] == pytest.approx(r.score_texts(["<eos>"])[0], abs=1e-6)
    with torch.no_grad():
        want = torch.sigmoid(r.model(input_ids=torch.tensor([[1]])).logits[0, 0]).item()
    assert out[0] == pytest.approx(want, abs=1e-6)


def test_classifier_long_text_truncated_to_positions():
    """Texts past the model's positions are truncated: GPT-2 (n_positions) and RoBERTa
    (positions start after the padding index: 18 embeddings hold 17 tokens)."""
    gpt2 = SequenceClassifierReward(_tiny_gpt2(n_positions=8), tokenizer=_word_tokenizer(), label=0, max_length=512)
    assert gpt2.max_length == 8
    assert gpt2.score_texts([_LONG])[0] == pytest.approx(gpt2.score_texts([" ".join(_LONG.split()[:8])])[0], abs=1e-6)
    rob = SequenceClassifierReward(_tiny_roberta(), tokenizer=_word_tokenizer(), label=1, max_length=512)
    assert rob.max_length == 17
    assert rob.score_texts([_LONG])[0] == pytest.approx(rob.score_texts([" ".join(_LONG.split()[:17])])[0], abs=1e-6)


def test_classifier_batching_pad_id_and_side():
    """Padding never changes a score: right padding even if the tokenizer pads left, and the
    pad id is the model's own ``config.pad_token_id`` (GPT-2 pools the last non-pad token)."""
    texts = ["a good movie", "bad", "", "i loved it , a great fun film", "<pad> a", "a <eos>", "good <pad> <pad>"]

    def check(r):
        together = r.score_texts(texts)
        alone = [r.score_texts([t])[0] for t in texts]
        assert together == pytest.approx(alone, abs=1e-5)
        return together

    base = check(SequenceClassifierReward(_tiny_gpt2(), tokenizer=_word_tokenizer(), label=0, batch_size=4))
    left = SequenceClassifierReward(_tiny_gpt2(), tokenizer=_word_tokenizer(padding_side="left"), label=0, batch_size=4)
    assert check(left) == pytest.approx(base, abs=1e-5)
    # the model config's pad id (the eos here) wins over the tokenizer's <pad>
    m = _tiny_gpt2(pad_token_id=1)
    r = SequenceClassifierReward(m, tokenizer=_word_tokenizer(), label=0, batch_size=4)
    assert r.pad_token_id == 1 == m.config.pad_token_id
    check(r)
    # a tokenizer with no special tokens at all: the model config's pad id pads, and a text with
    # no tokens is scored as the single pad token
    m = _tiny_gpt2(pad_token_id=0)
    r = SequenceClassifierReward(m, tokenizer=_word_tokenizer(specials=False), label=0, batch_size=4)
    assert r.empty_token_id == 0
    check(r)
    with torch.no_grad():
        want = torch.sigmoid(m(input_ids=torch.tensor([[0]])).logits[0, 0]).item()
    assert r.score_texts(["", "  "]) == pytest.approx([want, want], abs=1e-6)
    with pytest.raises(ValueError, match="pad"):
        SequenceClassifierReward(_tiny_gpt2(), tokenizer=_word_tokenizer(specials=False), label=0)
    with pytest.raises(ValueError, match="not a token id"):
        SequenceClassifierReward(_tiny_gpt2(pad_token_id=99), tokenizer=_word_tokenizer(), label=0)


def test_gsm8k_long_numbers_are_compared_exactly():
    """Regression: canonicalisation rounded to 28 significant digits, so two different
    answers longer than that compared equal (a wrong answer scored 1.0)."""
    from reward_models import extract_gsm8k_answer, gsm8k_answer_reward

    gold, wrong = "1234567890123456789012345678901", "1234567890123456789012345678999"
    assert extract_gsm8k_answer(f"#### {gold}") == gold
    assert gsm8k_answer_reward(["q"], [f"#### {wrong}"], answer=[f"#### {gold}"]) == [0.0]
    assert gsm8k_answer_reward(["q"], [f"#### {gold}.000"], answer=[f"#### {gold}"]) == [1.0]
