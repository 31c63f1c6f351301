"""The lm-evaluation-harness model type ``esolm`` (esorl.lm_eval_model).

A tiny random Eso-LM with a byte-level BPE tokenizer, saved to a temporary directory, is
checked against three independent computations: ``esorl.likelihood.exact`` on hand-built
rollouts, a slow per-token reference with a plain causal prefix (for ``order=l2r`` the exact
trajectory log-likelihood *is* the autoregressive one), and ``esorl.likelihood.replay``
(one forward per step) for random orders. Then lm-eval itself runs offline on the local task
YAMLs of ``tests/fixtures/lm_eval`` (JSONL data), in process and through
``python -m esorl.lm_eval_model``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402

from esorl import EsoLMConfig, EsoLMModel  # noqa: E402
from esorl.attention import CAUSAL  # noqa: E402
from esorl.likelihood import exact, replay  # noqa: E402
from esorl.lm_eval_model import EsoLMEval  # noqa: E402
from esorl.rollout import Rollout  # noqa: E402
from esorl.schedule import user_order  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "lm_eval"
CONTEXT = 64  # the tiny model's max_seq_len
BOS, MASK = 1, 4  # ids of esorl-trained tokenizers (<pad> <bos> <eos> <unk> <mask>)


def _rows(name):
    return [json.loads(x) for x in (FIX / name).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (trained on the fixture texts) and a random Eso-LM with every
    weight non-zero (non-uniform conditionals), saved together in float64."""
    from esorl.data import train_tokenizer

    out = tmp_path_factory.mktemp("esolm")
    texts = [" ".join(str(v) for v in r.values()) for f in ("esolm_mc.jsonl", "esolm_gen.jsonl") for r in _rows(f)]
    tok = train_tokenizer(texts * 3 + ["Question: Answer: Q: A:"] * 3, out, kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    m = EsoLMModel(EsoLMConfig(vocab_size=len(tok), mask_token_id=MASK, hidden_size=32, n_layers=2, n_heads=2, cond_dim=16,
                               max_seq_len=CONTEXT, dropout=0.0, pad_token_id=0, eos_token_id=2, bos_token_id=BOS))
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    m.to(torch.float64).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm64(model_dir):
    return EsoLMEval(pretrained=str(model_dir), dtype="float64", device="cpu", batch_size=3)


def _req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


def _ll(lm, pairs):
    return lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)


def _hf_split(lm, context, continuation):
    """lm-eval's own split (``TemplateLM._encode_pair``, HF semantics), then BOS before the
    context; an empty context is BOS alone."""
    enc = lambda s, **_: lm.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if not context:
        return [BOS], enc(continuation)
    shim = type("Shim", (), {"backend": "causal", "tok_encode": staticmethod(enc)})()
    ctx, cont = TemplateLM._encode_pair(shim, context, continuation)
    return [BOS] + ctx, cont


def _exact_one(model, ctx, cont, traj=None):
    """``esorl.likelihood.exact`` on a hand-built one-row rollout (l2r unless ``traj``)."""
    n = len(cont)
    traj = traj or user_order(torch.arange(n)[None], [1] * n)
    ro = Rollout.from_tokens(torch.tensor([ctx]), torch.ones(1, len(ctx), dtype=torch.bool), torch.tensor([cont]), traj)
    lp, valid = exact(model, ro)
    return float(lp[valid].sum()), ro


def _ar_reference(model, ctx, cont):
    """Slow autoregressive reference: one forward per continuation token over
    ``[context | earlier tokens | MASK]`` with plain causal attention (no esorl layout or mask
    code); log p of the token from the MASK slot. Returns (sum, all-argmax, argmax tokens)."""
    total, greedy, argmaxes = 0.0, True, []
    for j, y in enumerate(cont):
        ids = torch.tensor([ctx + cont[:j] + [MASK]])
        logits = model(ids, torch.arange(ids.shape[1])[None], CAUSAL)[0, -1]
        total += float(torch.log_softmax(logits.to(torch.float64), -1)[y])
        argmaxes.append(int(logits.argmax()))
        greedy &= argmaxes[-1] == y
    return total, greedy, argmaxes


PAIRS = [
    ("Question: What do bees make?\nAnswer:", " honey"),
    ("Question: What do bees make?\nAnswer:", " bread"),
    ("Question: How many legs does a cat have?\nAnswer: ", "four legs"),  # trailing space moves to the continuation
    ("", "What color is the sky?"),  # empty context: BOS is the context
    ("Q: Say yes.\nA:", " yes"),
    ("Is ice", " hot or cold?"),
]


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-9), ("float32", 1e-5)])
def test_loglikelihood_is_exact_and_autoregressive(model_dir, dtype, atol):
    lm = EsoLMEval(pretrained=str(model_dir), dtype=dtype, device="cpu", batch_size=4)
    got = _ll(lm, PAIRS)  # batched: mixed lengths, left-padded contexts
    with torch.no_grad():
        for (c, x), (lp, greedy) in zip(PAIRS, got):
            ctx, cont = _hf_split(lm, c, x)
            assert lm.encode_pair(c, x) == (ctx, cont)
            ex, _ = _exact_one(lm.model, ctx, cont)
            ar, ar_greedy, _ = _ar_reference(lm.model, ctx, cont)
            assert lp == pytest.approx(ex, abs=atol)
            assert lp == pytest.approx(ar, abs=atol)
            assert greedy == ar_greedy
    # one request at a time gives the same numbers as the batch
    assert [r[0] for r in _ll(lm, PAIRS[:1])] == pytest.approx([got[0][0]], abs=atol)
    # the trailing-space move: the split differs from naive encoding, the score does not change meaning
    ctx, cont = lm.encode_pair(PAIRS[2][0], PAIRS[2][1])
    assert lm.tokenizer.decode(cont) == " four legs"


def test_is_greedy_on_the_argmax_continuation(lm64):
    ctx = lm64.encode_pair("Q: What is two plus two?\nA:", " x")[0]
    with torch.no_grad():
        _, _, first = _ar_reference(lm64.model, ctx, [5])
        cont = [first[0]]
        for _ in range(4):  # grow the greedy continuation token by token
            cont.append(_ar_reference(lm64.model, ctx, cont + [5])[2][-1])
        (lp, greedy), = lm64.score_tokens([(ctx, cont)])
        assert greedy
        assert lp == pytest.approx(_ar_reference(lm64.model, ctx, cont)[0], abs=1e-9)
        other = cont[:-1] + [next(t for t in range(5, 60) if t != cont[-1])]
        assert lm64.score_tokens([(ctx, other)])[0][1] is False
        # the KV-cached sampler decodes the same argmax tokens (l2r greedy generation)
        text = lm64.generate_until([_req("generate_until", "Q: What is two plus two?\nA:", {"until": [], "max_gen_toks": len(cont)})])[0]
        eos = cont.index(2) if 2 in cont else len(cont)
        assert text == lm64.tokenizer.decode(cont[:eos], skip_special_tokens=True)


@pytest.mark.parametrize("steps", [0, 3])
def test_random_order_is_exact_under_its_trajectory(model_dir, lm64, steps):
    lm = EsoLMEval(pretrained=str(model_dir), dtype="float64", device="cpu", order="random", diffusion_steps=steps, seed=7, batch_size=4)
    pairs = [p for p in PAIRS if len(lm.encode_pair(*p)[1]) > 2]
    got = _ll(lm, pairs)
    with torch.no_grad():
        for (c, x), (lp, greedy) in zip(pairs, got):
            ctx, cont = lm.encode_pair(c, x)
            traj = lm.trajectory([(ctx, cont)])
            assert not torch.equal(traj.order[0], torch.arange(len(cont)))  # a genuinely different order
            if steps:  # alpha0 = 1: everything revealed in at most T steps, several tokens at once
                assert len(traj.step_sizes) <= steps and int(traj.step_sizes.max()) > 1
            ex, ro = _exact_one(lm.model, ctx, cont, traj)
            rp, _ = replay(lm.model, ro)  # one forward per step: an independent oracle
            assert lp == pytest.approx(ex, abs=1e-9) and lp == pytest.approx(float(rp.sum()), abs=1e-9)
            assert lp != pytest.approx(_ll(lm64, [(c, x)])[0][0], abs=1e-6)  # not the l2r number
    # keyed by the request's tokens: same numbers alone, in another batch, and in a new instance
    again = EsoLMEval(pretrained=str(model_dir), dtype="float64", device="cpu", order="random", diffusion_steps=steps, seed=7, batch_size=1)
    assert [r[0] for r in _ll(again, pairs[::-1])] == pytest.approx([r[0] for r in got[::-1]], abs=1e-9)
    other = EsoLMEval(pretrained=str(model_dir), dtype="float64", device="cpu", order="random", diffusion_steps=steps, seed=8)
    assert [r[0] for r in _ll(other, pairs)] != pytest.approx([r[0] for r in got], abs=1e-6)


def test_is_greedy_under_a_random_order(model_dir):
    """Two-token continuations that are greedy under their own (token-keyed) random order:
    built step by step in that order, then ``is_greedy`` must hold (and fail for a change)."""
    lm = EsoLMEval(pretrained=str(model_dir), dtype="float64", device="cpu", order="random", seed=3)

    def first_logits(ctx, cont, traj):
        seen = []
        h = lm.model.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            _exact_one(lm.model, ctx, cont, traj)
        finally:
            h.remove()
        return seen[0][0]  # (N, V), queries in σ order

    found, gen = [], torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(60):  # random contexts until a reversed order with two different greedy tokens turns up
            ctx = [BOS] + torch.randint(5, 250, (5,), generator=gen).tolist()
            for order in ([0, 1], [1, 0]):
                traj = user_order(torch.tensor([order]), [1, 1])
                cont = [5, 5]
                cont[order[0]] = int(first_logits(ctx, cont, traj)[0].argmax())  # first step: sees the context only
                cont[order[1]] = int(first_logits(ctx, cont, traj)[1].argmax())  # second step: sees the first token
                if lm.trajectory([(ctx, cont)]).order[0].tolist() != order:
                    continue  # this token pair is scored under the other order
                found.append((tuple(order), cont[0] != cont[1]))
                (lp, greedy), = lm.score_tokens([(ctx, cont)])
                assert greedy and lp == pytest.approx(_exact_one(lm.model, ctx, cont, traj)[0], abs=1e-9)
                swapped = cont[::-1]  # the same two tokens in the other positions: not greedy
                if cont[0] != cont[1] and lm.trajectory([(ctx, swapped)]).order[0].tolist() == order:
                    assert lm.score_tokens([(ctx, swapped)])[0][1] is False
            if ((1, 0), True) in found:
                break
    assert ((1, 0), True) in found, found  # a reversed order: greedy is read per query, in σ order


def test_loglikelihood_rolling(lm64):
    short = "What color is the sky on a clear day?"
    long = " ".join(r["question"] for r in _rows("esolm_mc.jsonl")) * 2
    toks = lm64.tok_encode(long)
    assert len(toks) > 2 * CONTEXT  # needs several windows
    got = lm64.loglikelihood_rolling([_req("loglikelihood_rolling", short), _req("loglikelihood_rolling", long),
                                      _req("loglikelihood_rolling", "")], disable_tqdm=True)
    with torch.no_grad():
        ex, _ = _exact_one(lm64.model, [BOS], lm64.tok_encode(short))
        assert got[0] == pytest.approx(ex, abs=1e-9)
        assert got[0] == pytest.approx(_ll(lm64, [("", short)])[0][0], abs=1e-9)
        # windowed: every token predicted once, each window within the model's positions, and the
        # total is the sum of the windows' autoregressive log-likelihoods
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        wins = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, BOS, CONTEXT - 1, 1)]
        assert sum(len(b) for _, b in wins) == len(toks) and max(len(a) + len(b) for a, b in wins) == CONTEXT
        assert got[1] == pytest.approx(sum(_ar_reference(lm64.model, a, b)[0] for a, b in wins), abs=1e-8)
    assert got[2] == 0.0  # an empty text has no tokens to score


def test_generate_until(lm64, model_dir):
    ctx = "Q: What do cats say?\nA:"
    full = lm64.generate_until([_req("generate_until", ctx, {"until": [], "max_gen_toks": 12})])[0]
    assert full and lm64.generate_until([_req("generate_until", ctx, {"until": [], "max_gen_toks": 12})])[0] == full  # greedy: deterministic
    stop = full[len(full) // 2]
    cut = lm64.generate_until([_req("generate_until", ctx, {"until": [stop, "\u2603"], "max_gen_toks": 12})])[0]
    assert cut == full[: full.index(stop)] and stop not in cut
    # greedy is the same in any batch; a long context is truncated on the left, not an error
    long = "Question: " + " ".join(r["question"] for r in _rows("esolm_mc.jsonl")) * 3
    reqs = [_req("generate_until", c, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}) for c in (ctx, long, ctx, "")]
    one = EsoLMEval(pretrained=str(model_dir), dtype="float64", device="cpu", batch_size=1).generate_until(reqs, disable_tqdm=True)
    many = lm64.generate_until(reqs, disable_tqdm=True)
    assert one == many and many[0] == many[2] and all("\n" not in s for s in many)
    # sampling: seeded (reproducible), repeats of one request differ
    hot = [_req("generate_until", ctx, {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 3.0})] * 3
    s1, s2 = lm64.generate_until(hot, disable_tqdm=True), lm64.generate_until(hot, disable_tqdm=True)
    assert s1 == s2 and len(set(s1)) > 1
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm64.generate_until([_req("generate_until", ctx, {"until": [], "max_gen_toks": CONTEXT})])


def test_degenerate_inputs(lm64):
    with pytest.raises(ValueError, match="empty continuation"):
        _ll(lm64, [("Question: x", "")])
    with pytest.raises(ValueError, match="empty continuation"):
        _ll(lm64, [("", "")])
    # an over-long context loses tokens on the left: the score is that of the last fitting tokens
    long = " ".join(r["question"] for r in _rows("esolm_mc.jsonl")) * 2
    (lp, _), = _ll(lm64, [(long, " honey")])
    ctx, cont = lm64.encode_pair(long, " honey")
    assert len(ctx) + len(cont) > CONTEXT
    with torch.no_grad():
        ex, _ = _exact_one(lm64.model, ctx[len(ctx) + len(cont) - CONTEXT:], cont)
    assert lp == pytest.approx(ex, abs=1e-9)
    with pytest.raises(ValueError, match="does not fit"):  # a continuation needs a context token too
        _ll(lm64, [("a", " b" * CONTEXT)])
    with pytest.raises(ValueError, match="order"):
        EsoLMEval(pretrained="x", order="r2l")
    with pytest.raises(ValueError, match="order=l2r takes neither"):
        EsoLMEval(pretrained="x", diffusion_steps=4)
    with pytest.raises(TypeError, match="unknown model_args"):
        EsoLMEval(pretrained="x", temperature=1.0)


@pytest.fixture
def no_network(monkeypatch):
    """Any TCP/IP connection attempt fails the test."""
    real = socket.socket.connect

    def guard(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)


def test_lm_eval_end_to_end_offline(model_dir, lm64, monkeypatch, no_network):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task YAMLs name their JSONL files relative to the repository
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)  # skips `pip list` / collect_env subprocesses
    out = lm_eval.simple_evaluate(
        model="esolm", model_args=f"pretrained={model_dir},dtype=float64,device=cpu,batch_size=4", tasks=["esolm_test_mc", "esolm_test_gen"],
        task_manager=TaskManager(include_path=str(FIX), include_defaults=False), bootstrap_iters=0, log_samples=True)
    res = out["results"]
    # multiple choice: every per-choice log-likelihood is esorl's exact one, and acc follows from them
    mc_rows, hits = _rows("esolm_mc.jsonl"), []
    samples = sorted(out["samples"]["esolm_test_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(mc_rows)
    with torch.no_grad():
        for s, row in zip(samples, mc_rows):
            context = f"Question: {row['question']}\nAnswer:"
            lls = [float(r[0][0]) for r in s["resps"]]
            want = [_exact_one(lm64.model, *_hf_split(lm64, context, " " + c))[0] for c in row["choices"]]
            assert lls == pytest.approx(want, abs=1e-9)
            hits.append(max(range(len(lls)), key=lls.__getitem__) == row["label"])
    assert res["esolm_test_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert 0.0 <= res["esolm_test_mc"]["acc_norm,none"] <= 1.0
    # generation: ran greedily with the task's kwargs, cut at "\n" / ".", and scored by exact match
    gen_rows = _rows("esolm_gen.jsonl")
    gs = sorted(out["samples"]["esolm_test_gen"], key=lambda s: s["doc_id"])
    texts = [s["resps"][0][0] for s in gs]
    direct = lm64.generate_until([_req("generate_until", f"Q: {r['question']}\nA:", {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False})
                                  for r in gen_rows], disable_tqdm=True)
    assert texts == direct and not any("\n" in t or "." in t for t in texts)
    em = sum(t == r["answer"] for t, r in zip(texts, gen_rows)) / len(gen_rows)
    assert res["esolm_test_gen"]["exact_match,none"] == pytest.approx(em)


def test_cli_wrapper_registers_esolm(model_dir, tmp_path):
    """``python -m esorl.lm_eval_model`` is lm-eval's CLI with ``esolm`` registered."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "esorl.lm_eval_model", "run", "--model", "esolm", "--model_args", f"pretrained={model_dir},dtype=float64,device=cpu",
           "--tasks", "esolm_test_mc", "--include_path", str(FIX), "--output_path", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results, p.stdout[-2000:]
    acc = json.loads(results[0].read_text())["results"]["esolm_test_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
