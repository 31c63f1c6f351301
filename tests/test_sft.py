"""SFT: the hybrid objective with a clean prompt at step 0 (docs/ESOLM.md §4/§5/§7), the pair
encoding, and ``esorl sft`` end to end."""

import pytest
import torch
import yaml

from esorl.attention import build_mask
from esorl.layout import exact_layout, trajectory_table
from esorl.objective import ObjectiveConfig, _ar_layout, _mdm_layout, hybrid_loss
from esorl.schedule import EPS, alpha

from conftest import tiny_model

MASK = 39


def _batch(B=6, L=14, seed=0):
    """Rows ``[prompt | completion | padding]`` with mixed prompt and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, MASK, (B, L), generator=g)
    plen = torch.randint(1, 6, (B,), generator=g)
    vlen = torch.minimum(plen + torch.randint(2, L - 4, (B,), generator=g), torch.tensor(L))
    ar = torch.arange(L)[None]
    v = ar < vlen[:, None]
    pm = ar < plen[:, None]
    x[~v] = 0
    return x, v, pm, plen, vlen


def test_all_false_prompt_mask_is_bit_identical():
    model = tiny_model()
    x, v, _, _, _ = _batch(B=8)
    none = torch.zeros_like(v)
    for a0, k in ((0.25, 0.5), (0.125, 0.25), (1.0, 1.0), (0.0, 0.0)):
        for shuffle in (True, False):
            cfg = ObjectiveConfig(alpha0=a0, batch_split=k, diffusion_shuffle=shuffle, sequential_shuffle=shuffle)
            for single in (False, True):
                a = hybrid_loss(model, x, v, cfg, 3, 1, torch.arange(8), 8, backend="sdpa", single_forward=single)
                b = hybrid_loss(model, x, v, cfg, 3, 1, torch.arange(8), 8, backend="sdpa", single_forward=single, prompt_mask=none)
                assert torch.equal(a.loss, b.loss) and torch.equal(a.mdm_sum, b.mdm_sum) and torch.equal(a.ar_sum, b.ar_sum)
                assert a.masked_tokens == b.masked_tokens and a.mdm_tokens == b.mdm_tokens and a.ar_tokens == b.ar_tokens


@pytest.mark.parametrize("single_forward", [False, True])
def test_ar_loss_is_completion_nll_given_prompt(single_forward):
    """α0 = 0, κ = 0: the loss is the left-to-right NLL of the completion tokens given the
    prompt, replayed one token per step with layout (a); prompt tokens are never scored and
    the normalisation counts completion tokens only."""
    model = tiny_model()
    x, v, pm, plen, vlen = _batch()
    B = len(x)
    cfg = ObjectiveConfig(alpha0=0.0, batch_split=0.0, sequential_shuffle=True)
    out = hybrid_loss(model, x, v, cfg, 1, 0, torch.arange(B), B, backend="sdpa", single_forward=single_forward, prompt_mask=pm)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(B):
            for j in range(int(plen[b]), int(vlen[b])):
                ctx = x[b : b + 1, :j]
                tab = trajectory_table(ctx, torch.ones_like(ctx, dtype=torch.bool), x[b : b + 1, j : j + 1], torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))
                lay, qs = exact_layout(tab, j, MASK)
                lg = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), logits_slice=qs)
                total += torch.log_softmax(lg, -1)[0, 0, x[b, j]]
                n += 1
    assert n == int((v & ~pm).sum())
    assert out.ar_tokens == n and out.mdm_tokens == 0 and out.masked_tokens == n
    assert torch.allclose(out.loss, -total / n, atol=1e-10)


def test_mdm_prompt_clean_first_and_completion_normalised():
    """α0 = 1 (MDM): the prompt is clean, first in the array and left to right whatever the
    shuffle; only completion tokens are masked/scored; the loss is divided by the number of
    completion tokens."""
    model = tiny_model()
    x, v, pm, plen, vlen = _batch(B=8, seed=1)
    B, L = x.shape
    cfg = ObjectiveConfig(alpha0=1.0, batch_split=1.0, diffusion_shuffle=True)
    g = torch.Generator().manual_seed(0)
    for t in (torch.full((B,), 1.0, dtype=torch.float64), torch.rand(B, generator=g, dtype=torch.float64)):
        mu, sh = torch.rand(B, L, generator=g, dtype=torch.float64), torch.rand(B, L, generator=g, dtype=torch.float64)
        lay, tgt, is_q, w = _mdm_layout(x, v, t, mu, sh, cfg, "elbo", MASK, pm)
        for b in range(B):
            P, V = int(plen[b]), int(vlen[b])
            assert torch.equal(lay.positions[b, :P], torch.arange(P)) and torch.equal(lay.ids[b, :P], x[b, :P])
            assert not is_q[b, :P].any() and not lay.desc.is_query[b, :P].any() and (lay.desc.step[b, :P] == 0).all()
            assert torch.equal(tgt[b, :P], x[b, :P])
            # every scored slot is a completion position; with t = 1 every completion token is
            assert (lay.positions[b][is_q[b]] >= P).all() and (lay.positions[b][is_q[b]] < V).all()
            if t[b] == 1.0:
                assert int(is_q[b].sum()) == V - P
            # the clean completion tokens come after the prompt, in a shuffled order
            clean = ~is_q[b] & lay.desc.valid[b]
            assert torch.equal(clean[:P], torch.ones(P, dtype=torch.bool))
        # the AR layout too: prompt first, left to right, before the (shuffled) clean tokens
        la, ta, qa, M = _ar_layout(x, v, mu, sh, ObjectiveConfig(alpha0=0.5, batch_split=0.0, sequential_shuffle=True), MASK, pm)
        for b in range(B):
            P = int(plen[b])
            assert torch.equal(la.positions[b, :P], torch.arange(P)) and torch.equal(la.ids[b, :P], x[b, :P])
            assert (la.positions[b, M:][qa[b]] >= P).all()
    out = hybrid_loss(model, x, v, cfg, 2, 0, torch.arange(B), B, backend="sdpa", prompt_mask=pm)
    n_comp = int((v & ~pm).sum())
    assert out.mdm_tokens == n_comp and out.ar_tokens == 0 and 0 < out.masked_tokens <= n_comp
    assert torch.allclose(out.loss, out.mdm_sum / n_comp)
    # single forward and shard invariance with completion counts
    sf = hybrid_loss(model, x, v, cfg, 2, 0, torch.arange(B), B, backend="sdpa", prompt_mask=pm, single_forward=True)
    assert torch.allclose(out.loss, sf.loss, atol=1e-12)
    hcfg = ObjectiveConfig(alpha0=0.25, batch_split=0.5)
    full = hybrid_loss(model, x, v, hcfg, 3, 7, torch.arange(B), B, backend="sdpa", prompt_mask=pm)
    is_mdm = torch.arange(B) < B // 2
    sc = v & ~pm
    counts = (float(sc[is_mdm].sum()), float(sc[~is_mdm].sum()))
    assert (full.mdm_tokens, full.ar_tokens) == counts
    parts = [hybrid_loss(model, x[i::2], v[i::2], hcfg, 3, 7, torch.arange(B)[i::2], B, counts, backend="sdpa", prompt_mask=pm[i::2]).loss for i in range(2)]
    assert torch.allclose(full.loss, sum(parts), atol=1e-12)


def test_mdm_weights_unchanged_by_prompt():
    """The ELBO weight per masked completion token is α0(1−ε)/(1−α_t), prompt or not."""
    x, v, pm, _, _ = _batch(B=4)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    cfg = ObjectiveConfig(alpha0=0.5, batch_split=1.0)
    mu = sh = torch.rand(4, x.shape[1], dtype=torch.float64)
    _, _, _, w = _mdm_layout(x, v, t, mu, sh, cfg, "elbo", MASK, pm)
    assert torch.allclose(w, 0.5 * (1 - EPS) / (1 - alpha(t, 0.5)))


class _WordTok:
    """A minimal tokenizer (whitespace words → ids) for the pair encoder."""

    bos_token_id, eos_token_id, pad_token_id, mask_token_id = 1, 2, 0, 99

    def __call__(self, texts, **kw):
        return {"input_ids": [[10 + len(w) for w in t.split()] for t in texts]}


def test_encode_pairs_rows_and_errors():
    from esorl.data.pairs import encode_pairs

    out, dropped = encode_pairs(["a bb", "ccc"], ["dd e", "f"], _WordTok(), 8)
    assert dropped == 0
    assert out["input_ids"][0].tolist() == [1, 11, 12, 12, 11, 2, 0, 0] and out["input_ids"][1].tolist() == [1, 13, 11, 2, 0, 0, 0, 0]
    assert out["prompt_mask"][0].tolist() == [True] * 3 + [False] * 5 and out["valid"][1].tolist() == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="row 1 .*max_length=5"):
        encode_pairs(["a", "b c d"], ["e", "f g"], _WordTok(), 5)
    out, dropped = encode_pairs(["a", "b c d e f"], ["e f g h i", "g"], _WordTok(), 5, truncate=True)
    assert dropped == 1 and out["input_ids"].tolist() == [[1, 11, 11, 11, 11]] and out["prompt_mask"][0].sum() == 2
    out, _ = encode_pairs(["a"], ["b"], _WordTok(), 4, add_bos=False)
    assert out["input_ids"][0].tolist() == [11, 11, 2, 0] and out["prompt_mask"][0].tolist() == [True, False, False, False]


def test_esorl_sft_end_to_end(tmp_path):
    """``esorl sft`` on synthetic prompt/completion pairs from a tiny model: metrics, a
    loadable ``model/``, falling loss over 40 steps, and ``--resume`` continuing the run."""
    from esorl import EsoLMModel
    from esorl.cli import main as cli
    from esorl.train.common import read_metrics
    from esorl.data.pairs import SFTDataConfig, write_synthetic_pairs

    from rl_fixtures import make_tiny_policy

    policy = make_tiny_policy(tmp_path)
    cache, run = tmp_path / "cache", tmp_path / "run"
    recipe = {
        "model": {"init_from": str(policy)},
        "data": {"source": "synthetic", "synthetic_size": 400, "max_length": 32, "truncate": True, "cache_dir": str(cache)},
        "objective": {"alpha0": 0.25, "batch_split": 0.5},
        "training": {"learning_rate": 3e-3, "warmup_steps": 2,
                     "max_steps": 40, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 16, "eval_steps": 20, "eval_batches": 2, "save_steps": 20,
                  "output_dir": str(run), "bf16": False, "attention_backend": "sdpa", "logging_steps": 1, "ema_decay": 0.9},
        "logging": {"wandb_mode": "disabled"},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["sft", "--config", str(path)]) == 0
    pairs = (write_synthetic_pairs(SFTDataConfig(synthetic_size=400, cache_dir=str(cache))) / "train.jsonl").read_text().splitlines()
    assert len(pairs) > 300 and all(len(yaml.safe_load(p)["prompt"].split()) == 3 for p in pairs[:20])
    recs = read_metrics(run / "metrics.jsonl")
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    evals = [r for r in recs if "val/nelbo" in r]
    assert len(evals) == 2 and evals[-1]["val/nelbo"] < evals[0]["val/nelbo"] + 1.0 and evals[-1]["val/ppl"] > 1
    m = EsoLMModel.from_pretrained(str(run / "model"))
    assert m.config.vocab_size == EsoLMModel.from_pretrained(str(policy)).config.vocab_size
    assert (run / "model" / "tokenizer.json").exists() and (run / "config.yaml").exists()
    # resume continues at step 40 with a longer schedule
    assert cli(["sft", "--config", str(path), "--resume", "training.max_steps=43", "training.eval_steps=0"]) == 0
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 44))


def test_sft_config_errors(tmp_path):
    from esorl.config import load_config
    from esorl.train.sft import SFTConfig

    with pytest.raises(ValueError, match="init_from is required"):
        load_config(SFTConfig, None, [])
    with pytest.raises(ValueError, match="prompt_template"):
        load_config(SFTConfig, None, ["model.init_from=x", "data.prompt_template={question}"])
    cfg = load_config(SFTConfig, "recipes/sft/synthetic_prompt_cpu.yaml", [])
    assert cfg.model.init_from == "runs/pretrain_synthetic_cpu/model" and cfg.data.source == "synthetic"
    gsm = load_config(SFTConfig, "recipes/sft/gsm8k_owt.yaml", [])
    assert gsm.data.max_length == 512 and gsm.data.prompt_field == "question" and gsm.data.completion_field == "answer"


def test_sft_with_lora_trains_adapters_and_exports_merged(tmp_path):
    """``lora.enabled``: only the adapters' target modules change in the exported model (a
    plain Eso-LM, adapters merged); a resume cannot switch LoRA off."""
    from esorl import EsoLMModel
    from esorl.config import load_config
    from esorl.train.common import CheckpointError
    from esorl.train.sft import SFTConfig, run_sft

    from rl_fixtures import make_tiny_policy

    policy = make_tiny_policy(tmp_path)
    run = tmp_path / "run"
    d = {"model": {"init_from": str(policy)},
         "data": {"source": "synthetic", "synthetic_size": 400, "max_length": 32, "truncate": True, "cache_dir": str(tmp_path / "cache")},
         "objective": {"alpha0": 0.25, "batch_split": 0.5}, "training": {"learning_rate": 1e-2, "warmup_steps": 0,
                      "max_steps": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 8, "eval_steps": 0, "save_steps": 3, "output_dir": str(run),
                   "bf16": False, "attention_backend": "sdpa", "logging_steps": 1, "ema_decay": 0.0},
         "lora": {"enabled": True, "r": 4, "lora_alpha": 8}, "logging": {"wandb_mode": "disabled"}}
    res = run_sft(load_config(SFTConfig, None, [], base=d))
    base = dict(EsoLMModel.from_pretrained(str(policy)).named_parameters())
    out = EsoLMModel.from_pretrained(res["model_dir"])
    changed = {n for n, p in out.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all(n.startswith("blocks.") and ("attn" in n or "mlp" in n) for n in changed), changed
    d["lora"]["enabled"] = False
    d["training"]["max_steps"] = 5
    with pytest.raises(CheckpointError, match="lora"):
        run_sft(load_config(SFTConfig, None, [], base=d), resume="latest")
