"""Tests of ``esorl.convert.official``: reading released Eso-LM checkpoints safely and exactly.

1. The shared reference fixture (``shared/fixtures/reference_tiny``): weights recovered bit for
   bit, conversion round-trips through ``from_pretrained``/``AutoModel``, and the converted
   model reproduces the reference's logits.
2. A synthetic Lightning checkpoint (unimportable config/tokenizer classes): the converted
   model equals the independent float64 re-implementation ``tests/reference_esolm.py``.
3. Malicious pickles: nothing from the file ever runs.
4. Clear errors.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

import esorl  # noqa: F401 - registers the auto classes
from esorl import EsoLMConfig, EsoLMModel
from esorl.attention import build_mask
from esorl.convert import official
from esorl.convert.official import (
    CheckpointError,
    UnsafeCheckpointError,
    convert_official,
    ema_state_dict,
    infer_config,
    load_official_checkpoint,
    parameter_order,
)
from esorl.layout import exact_layout, one_copy_layout, sequential_layout, sorted_table, trajectory_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_esolm as ref  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "reference_tiny"
CKPT = FIXTURE / "reference_tiny.ckpt"
needs_fixture = pytest.mark.skipif(
    not CKPT.exists(), reason=f"shared reference fixture not found at {CKPT} (expected next to the repository)"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add contention (on a busy 2-core box each op can
    # take milliseconds with 2 threads). Restored after the module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_same_tensors(got: dict, want: dict):
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k].cpu(), want[k].cpu()), k


def _layout_logits(model, lay, **kw):
    with torch.no_grad():
        return model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), raw_logits=True, **kw)


# ----------------------------------------------------------------------------- esorl paths


def esorl_diffusion_logits(model, x, masked, order, mask_id):
    """Layout (d) through esorl; logits ``(B, L, V)`` by position. ``order``: clean positions
    then masked positions, in array order."""
    B, L = x.shape
    key = torch.empty_like(order)
    key.scatter_(1, order, torch.arange(L).expand(B, -1))
    tab, sidx = sorted_table(x, torch.arange(L).expand(B, -1), torch.ones_like(x, dtype=torch.bool), masked.long(), key)
    assert torch.equal(sidx, order)
    lay = one_copy_layout(tab, tab.steps > 0, mask_id)
    lg = _layout_logits(model, lay)
    out = torch.empty_like(lg)
    out.scatter_(1, sidx[..., None].expand(-1, -1, lg.shape[-1]), lg)
    return out


def esorl_sequential_logits(model, x, masked, order, mask_id):
    """Layout (e) through esorl; ``(logits (B, L, V) by position, bool (B, L) where defined)``.
    ``order``: the clean positions (any order), then the masked positions left to right."""
    B, L = x.shape
    key = torch.empty_like(order)
    key.scatter_(1, order, torch.arange(L).expand(B, -1))
    tab, sidx = sorted_table(x, torch.arange(L).expand(B, -1), torch.ones_like(x, dtype=torch.bool), masked.long(), key)
    assert torch.equal(sidx, order)
    tab.steps = torch.where(tab.steps > 0, torch.cumsum(tab.steps, 1), 0)  # each masked token its own step
    lay, qidx, qv = sequential_layout(tab, mask_id)
    lg = _layout_logits(model, lay, logits_slice=slice(L, None))
    out = torch.zeros(B, L, lg.shape[-1], dtype=lg.dtype)
    defined = torch.zeros(B, L, dtype=torch.bool)
    posq = tab.positions.gather(1, qidx)
    for b in range(B):
        for i in range(qidx.shape[1]):
            if qv[b, i]:
                out[b, posq[b, i]] = lg[b, i]
                defined[b, posq[b, i]] = True
    return out, defined


def esorl_exact_logits(model, prompt, completion, order, step_sizes, mask_id):
    """Layout (a) through esorl: logits ``(B, N, V)`` of every completion position."""
    B, N = completion.shape
    P = prompt.shape[1]
    step_of_rank = torch.repeat_interleave(torch.arange(1, len(step_sizes) + 1), torch.as_tensor(step_sizes))
    steps = torch.empty(B, N, dtype=torch.long)
    steps.scatter_(1, order, step_of_rank.expand(B, -1))
    tab = trajectory_table(prompt, torch.ones_like(prompt, dtype=torch.bool), completion, order, steps)
    lay, qs = exact_layout(tab, P, mask_id)
    lg = _layout_logits(model, lay, logits_slice=qs)
    out = torch.empty_like(lg)
    out.scatter_(1, order[..., None].expand(-1, -1, lg.shape[-1]), lg)
    return out


# ----------------------------------------------------------------------------- 1. shared fixture


@needs_fixture
def test_fixture_weights_only_load_refuses():
    with pytest.raises(pickle.UnpicklingError):
        torch.load(CKPT, weights_only=True)


@needs_fixture
def test_fixture_load_recovers_raw_and_ema_weights():
    from safetensors.torch import load_file

    ck = load_official_checkpoint(CKPT)
    _assert_same_tensors(ck["state_dict"], load_file(FIXTURE / "weights.safetensors"))
    assert ck["global_step"] == 7
    assert ck["ema"]["decay"] == pytest.approx(0.9999) and ck["ema"]["num_updates"] == 7
    assert len(ck["ema"]["shadow_params"]) == 30
    _assert_same_tensors(ema_state_dict(ck["state_dict"], ck["ema"]["shadow_params"]), load_file(FIXTURE / "ema_weights.safetensors"))
    stubbed = set(ck["stubbed_globals"])
    assert {"fake_omegaconf.DictConfig", "fake_omegaconf.ContainerMetadata", "fake_omegaconf.AnyNode"} <= stubbed
    assert {"fake_tokenizers.GPT2TokenizerFast", "fake_tokenizers._rebuild_tokenizer", "typing.Any"} <= stubbed
    assert not any(s.startswith(("torch.", "collections.", "builtins.", "_codecs.")) for s in stubbed), stubbed
    assert "fake_omegaconf" not in sys.modules and "fake_tokenizers" not in sys.modules
    order = json.loads((FIXTURE / "config.json").read_text())["parameter_order"]
    assert parameter_order(ck["state_dict"]) == order == ref.reference_parameter_order(2)


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    """The fixture converted twice: EMA (default) and RAW (--no-ema)."""
    if not CKPT.exists():
        pytest.skip(f"shared reference fixture not found at {CKPT}")
    root = tmp_path_factory.mktemp("fixture_convert")
    ema = convert_official(CKPT, root / "ema", tokenizer=None, n_heads=2, max_seq_len=32)
    raw = convert_official(CKPT, root / "raw", use_ema=False, tokenizer=None, n_heads=2, max_seq_len=32)
    return ema, raw


@needs_fixture
def test_fixture_convert_roundtrip(fixture_dirs):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    ema_dir, raw_dir = fixture_dirs
    assert not list(ema_dir.parent.glob("*.tmp-*")), "temporary build directory left behind"
    for d, wfile, kind in ((ema_dir, "ema_weights.safetensors", "ema"), (raw_dir, "weights.safetensors", "raw")):
        want = load_file(FIXTURE / wfile)
        assert (d / "model.safetensors").exists() and (d / "config.json").exists()
        cfg = AutoConfig.from_pretrained(d)
        assert isinstance(cfg, EsoLMConfig)
        assert (cfg.vocab_size, cfg.mask_token_id, cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.cond_dim, cfg.mlp_ratio, cfg.max_seq_len) == (
            101, 100, 64, 2, 2, 32, 4, 32,
        )  # fmt: skip
        assert cfg.pad_token_id != cfg.mask_token_id
        info = json.loads((d / "conversion.json").read_text())
        assert info["weights"] == kind and info["global_step"] == 7 and info["num_parameters"] == 151141
        for m in (EsoLMModel.from_pretrained(d), AutoModel.from_pretrained(d)):
            assert isinstance(m, EsoLMModel)
            _assert_same_tensors(dict(m.state_dict()), want)


@needs_fixture
def test_fixture_cases_reproduced(fixture_dirs):
    """The RAW conversion reproduces the reference's logits (diffusion, sequential, sampler)."""
    from safetensors.torch import load_file

    model = EsoLMModel.from_pretrained(fixture_dirs[1]).eval()
    C = load_file(FIXTURE / "cases.safetensors")
    tol = 1e-4

    x, zt, si = C["diffusion_x"], C["diffusion_zt"], C["diffusion_sort_idx"]
    masked = zt == 100
    lg = esorl_diffusion_logits(model, x, masked, si, 100)
    assert (lg - C["diffusion_logits"])[masked].abs().max() < tol

    x, z0, si = C["sequential_x"], C["sequential_z0"], C["sequential_sort_idx"]
    lg, defined = esorl_sequential_logits(model, x, z0 == 100, si, 100)
    assert torch.equal(defined, z0 == 100)
    assert (lg - C["sequential_logits"])[defined].abs().max() < tol

    for name, P in (("sampler_mixed", 0), ("prompt", 8)):
        x, sig, ks = C[name + "_x"], C[name + "_sigma"], C[name + "_step_sizes"].tolist()
        ks = ks[1:] if P else ks  # the prompt case's first step is the prompt itself
        lg = esorl_exact_logits(model, x[:, :P], x[:, P:], sig[:, P:] - P, ks, 100)
        assert (lg - C[name + "_logits"][:, P:]).abs().max() < tol, name


@needs_fixture
def test_reference_reimplementation_reproduces_fixture():
    """The independent oracle itself matches the reference implementation's numbers."""
    from safetensors.torch import load_file

    W = load_file(FIXTURE / "weights.safetensors")
    C = load_file(FIXTURE / "cases.safetensors")
    x, zt, si = C["diffusion_x"], C["diffusion_zt"], C["diffusion_sort_idx"]
    lg = ref.diffusion_reference(W, x, zt == 100, si, 2, 100)
    assert (lg - C["diffusion_logits"].double())[zt == 100].abs().max() < 1e-4
    x, z0, si = C["sequential_x"], C["sequential_z0"], C["sequential_sort_idx"]
    lg = ref.sequential_reference(W, x, z0 == 100, si, 2, 100)
    assert (lg - C["sequential_logits"].double())[z0 == 100].abs().max() < 1e-4
    x, sig, ks = C["prompt_x"], C["prompt_sigma"], C["prompt_step_sizes"].tolist()
    lg = ref.reference_trajectory_logits(W, x[:, :8], x[:, 8:], sig[:, 8:] - 8, ks[1:], 2, 100)
    assert (lg - C["prompt_logits"][:, 8:].double()).abs().max() < 1e-4


# ----------------------------------------------------------------------------- 2. synthetic checkpoint

SYN = dict(n_layers=2, hidden=48, n_heads=3, cond_dim=16, vocab=37, context=40)
SYN_MASK = SYN["vocab"] - 1

_THROWAWAY_CONFIG_SRC = textwrap.dedent(
    """
    class CLASS:
        def __init__(self):
            self.model = dict(hidden=48, n_heads=3)
            self.lr = 3e-4
        def __setstate__(self, state):
            open(MARKER, "w").write("setstate ran")
            self.__dict__.update(state)
    """
)
_THROWAWAY_TOKENIZER_SRC = textwrap.dedent(
    """
    class CLASS:
        def __init__(self):
            self.name_or_path = "gpt2"
        def __reduce__(self):
            return (CLASS, ())
    """
)


def _throwaway_objects(tmp: Path, marker: Path, config=None, tokenizer=None):
    """Instances of classes from modules that no longer exist when the checkpoint is read.

    ``config`` / ``tokenizer``: ``(module, class)``; by default a fresh random module with
    ``TrainConfig`` / ``FakeTokenizer`` (not on the converter's allowlist). Returns
    ``([module names], (config object, tokenizer object))``; the config's ``__setstate__``
    writes ``marker``."""
    rand = f"esorl_throwaway_{uuid.uuid4().hex[:8]}"
    config = config or (rand, "TrainConfig")
    tokenizer = tokenizer or (rand, "FakeTokenizer")
    sources: dict[str, str] = {}
    for (mod, cls), src in ((config, _THROWAWAY_CONFIG_SRC), (tokenizer, _THROWAWAY_TOKENIZER_SRC)):
        sources[mod] = sources.get(mod, "") + src.replace("CLASS", cls).replace("MARKER", repr(str(marker)))
    for mod, src in sources.items():
        assert mod not in sys.modules
        (tmp / f"{mod}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    try:
        cfg_obj = getattr(__import__(config[0]), config[1])()
        tok_obj = getattr(__import__(tokenizer[0]), tokenizer[1])()
    finally:
        sys.path.remove(str(tmp))
    return list(sources), (cfg_obj, tok_obj)


def _forget_modules(names, tmp: Path):
    for name in names:
        sys.modules.pop(name, None)
        (tmp / f"{name}.py").unlink()
    assert str(tmp) not in sys.path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A Lightning-style checkpoint of a random 2-block model, converted with its EMA weights.

    Its config and tokenizer are instances of ``fake_omegaconf.DictConfig`` /
    ``fake_tokenizers.GPT2TokenizerFast`` (the stand-in names the reference fixture uses, on
    the converter's stub allowlist) from modules deleted before the checkpoint is read.
    Returns a dict: ``dir`` (converted model), ``ckpt``, ``raw`` / ``ema`` (reference-named
    state dicts), ``modules`` (the vanished modules), ``marker`` (a file that only code
    from the checkpoint would create). The KV-cached sampler test takes its case from
    :func:`kv_sampler_reference_case`.
    """
    tmp = tmp_path_factory.mktemp("synthetic")
    marker = tmp / "marker_setstate"
    raw = ref.random_reference_state_dict(SYN["n_layers"], SYN["hidden"], SYN["n_heads"], SYN["cond_dim"], SYN["vocab"], seed=11)
    g = torch.Generator().manual_seed(12)
    ema = {k: (v if k == "rotary_emb.inv_freq" else v + 0.01 * torch.randn(v.shape, generator=g)) for k, v in raw.items()}
    order = ref.reference_parameter_order(SYN["n_layers"])
    names, (cfg_obj, tok_obj) = _throwaway_objects(
        tmp, marker, config=("fake_omegaconf", "DictConfig"), tokenizer=("fake_tokenizers", "GPT2TokenizerFast")
    )
    ckpt = {
        "epoch": 0,
        "global_step": 3,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": {"backbone." + k: v for k, v in raw.items()},
        "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": [ema[n].clone() for n in order]},
        "hyper_parameters": {"config": cfg_obj, "tokenizer": tok_obj},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
    }
    path = tmp / "synthetic.ckpt"
    torch.save(ckpt, path)
    _forget_modules(names, tmp)
    out = convert_official(path, tmp / "converted", tokenizer=None, max_seq_len=SYN["context"])
    assert not marker.exists()
    return {"dir": out, "ckpt": path, "raw": raw, "ema": ema, "modules": names, "marker": marker, "tmp": tmp}


def random_trajectory(seed: int, B: int = 3, P: int = 5, N: int = 14, step_sizes=(3, 1, 4, 2, 4), vocab: int = SYN["vocab"] - 1):
    """A random teacher-forced trajectory ``(prompt (B, P), completion (B, N), order (B, N),
    step_sizes)`` with steps of size > 1 and a prompt (docs/ESOLM.md §4: step 1 alone cannot reveal a
    mask or rotary error). Shared by the exact-layout test and the KV-cached sampler test."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (B, P), generator=g)
    completion = torch.randint(0, vocab, (B, N), generator=g)
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    assert sum(step_sizes) == N
    return prompt, completion, order, list(step_sizes)


def _random_training_batch(seed: int, B: int, L: int, fractions, sequential: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, SYN_MASK, (B, L), generator=g)
    masked = torch.zeros(B, L, dtype=torch.bool)
    orders = []
    for b, f in enumerate(fractions):
        n = int(round(f * L))
        perm = torch.randperm(L, generator=g)
        masked[b, perm[:n]] = True
        clean = perm[n:][torch.randperm(L - n, generator=g)]
        m = perm[:n].sort().values if sequential else perm[:n][torch.randperm(n, generator=g)]
        orders.append(torch.cat([clean, m]))
    return x, masked, torch.stack(orders)


def _float64_model(d):
    return EsoLMModel.from_pretrained(d).double().eval()


def test_synthetic_conversion_uses_ema_and_stubs_vanished_classes(synthetic):
    ck = load_official_checkpoint(synthetic["ckpt"])
    assert ck["global_step"] == 3 and ck["ema"]["num_updates"] == 3
    assert {"fake_omegaconf.DictConfig", "fake_tokenizers.GPT2TokenizerFast"} <= set(ck["stubbed_globals"])
    # DictConfig.__setstate__ (which would write the marker) never ran, its module was not imported
    assert not synthetic["marker"].exists() and not set(synthetic["modules"]) & set(sys.modules)

    m = EsoLMModel.from_pretrained(synthetic["dir"])
    c = m.config
    assert (c.n_layers, c.hidden_size, c.n_heads, c.cond_dim, c.vocab_size, c.mask_token_id, c.max_seq_len) == (2, 48, 3, 16, 37, 36, 40)
    assert c.pad_token_id != c.mask_token_id
    _assert_same_tensors(dict(m.state_dict()), synthetic["ema"])


@pytest.mark.parametrize("phase", ["diffusion", "sequential"])
def test_synthetic_training_layouts_match_reference(synthetic, phase):
    """esorl (float64) == the independent re-implementation (float64) on random orders."""
    model = _float64_model(synthetic["dir"])
    B, L = 4, SYN["context"]
    fractions = [0.3, 1.0, 0.6, 1 / L]
    x, masked, order = _random_training_batch(21 if phase == "diffusion" else 22, B, L, fractions, phase == "sequential")
    if phase == "diffusion":
        got = esorl_diffusion_logits(model, x, masked, order, SYN_MASK)
        want = ref.diffusion_reference(synthetic["ema"], x, masked, order, SYN["n_heads"], SYN_MASK)
        assert got.dtype == torch.float64
        assert (got - want).abs().max() < 1e-9  # every slot: the mask is plain causal
        assert want[masked].abs().max() > 0.5  # non-trivial logits (adaLN / output layer non-zero)
    else:
        got, defined = esorl_sequential_logits(model, x, masked, order, SYN_MASK)
        want = ref.sequential_reference(synthetic["ema"], x, masked, order, SYN["n_heads"], SYN_MASK)
        assert torch.equal(defined, masked)
        assert (got - want)[masked].abs().max() < 1e-9


def kv_sampler_reference_case(synthetic, seed: int = 31):
    """The KV-cached-sampler-path comparison case (docs/ESOLM.md §4 (b)), for the sampler's test.

    Returns ``(model, (prompt, completion, order, step_sizes), want, mask_id)``: the converted
    model in float64, a random teacher-forced trajectory (prompt, steps of size > 1), and the
    oracle's per-position logits ``want (B, N, V)`` (float64, raw: MASK logit kept), computed
    by ``tests/reference_esolm.py`` step by step from the EMA state dict, never through esorl.
    A sampler teacher-forced to emit ``completion`` in order ``order`` with ``step_sizes`` must
    report, for every completion position, the logits ``want`` (atol 1e-9 in float64).
    """
    model = _float64_model(synthetic["dir"])
    prompt, completion, order, ks = random_trajectory(seed)
    want = ref.reference_trajectory_logits(synthetic["ema"], prompt, completion, order, ks, SYN["n_heads"], SYN_MASK)
    return model, (prompt, completion, order, ks), want, SYN_MASK


def test_synthetic_exact_layout_matches_reference_replay(synthetic):
    """Layout (a) in one pass == the oracle's step-by-step replay (rules 1–4 built token by
    token), on the case :func:`kv_sampler_reference_case` hands to the sampler test."""
    model, (prompt, completion, order, ks), want, mask_id = kv_sampler_reference_case(synthetic)
    got = esorl_exact_logits(model, prompt, completion, order, ks, mask_id)
    assert (got - want).abs().max() < 1e-9
    assert want.abs().max() > 0.5


def test_synthetic_raw_weights_and_overwrite(synthetic):
    out = synthetic["tmp"] / "converted"  # exists and is non-empty
    with pytest.raises(FileExistsError, match="converted"):
        convert_official(synthetic["ckpt"], out, use_ema=False, tokenizer=None, max_seq_len=40)
    raw_dir = convert_official(synthetic["ckpt"], synthetic["tmp"] / "raw", use_ema=False, tokenizer=None, max_seq_len=40)
    _assert_same_tensors(dict(EsoLMModel.from_pretrained(raw_dir).state_dict()), synthetic["raw"])
    # overwrite replaces atomically and leaves nothing behind
    convert_official(synthetic["ckpt"], raw_dir, use_ema=True, tokenizer=None, max_seq_len=40, overwrite=True)
    _assert_same_tensors(dict(EsoLMModel.from_pretrained(raw_dir).state_dict()), synthetic["ema"])
    assert not [p for p in synthetic["tmp"].iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _fake_tokenizer_module(monkeypatch, load_tokenizer):
    import types

    mod = types.ModuleType("esorl.data.tokenizer")
    mod.load_tokenizer = load_tokenizer
    monkeypatch.setitem(sys.modules, "esorl.data.tokenizer", mod)


def test_tokenizer_fallback_writes_settings(synthetic, monkeypatch, capsys):
    """When the tokenizer cannot be loaded (offline), its settings are written instead."""

    def offline(spec):
        raise FileNotFoundError(f"tokenizer {spec!r} is neither a local directory nor loadable from the hub (offline)")

    _fake_tokenizer_module(monkeypatch, offline)
    out = convert_official(synthetic["ckpt"], synthetic["tmp"] / "with_tok", tokenizer="gpt2", max_seq_len=40)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pad_token_id"] != cfg["mask_token_id"]
    s = json.loads((out / "tokenizer_settings.json").read_text())
    assert s["name"] == "gpt2" and s["mask_token_id"] == 36 and s["pad_token_id"] != 36 and "never pad with 36" in s["note"]
    assert "warning: could not load tokenizer 'gpt2'" in capsys.readouterr().err
    # The GPT-2 vocabulary (shapes only, meta tensors): pad = eos = 50256, never MASK = 50257.
    meta = {k: torch.empty(v.shape, device="meta") for k, v in synthetic["raw"].items() if k != "rotary_emb.inv_freq"}
    meta["vocab_embed.embedding"] = torch.empty(50258, 48, device="meta")
    meta["output_layer.linear.weight"] = torch.empty(50258, 48, device="meta")
    meta["output_layer.linear.bias"] = torch.empty(50258, device="meta")
    cfg = infer_config(meta, n_heads=3)
    assert (cfg.mask_token_id, cfg.pad_token_id, cfg.eos_token_id) == (50257, 50256, 50256)
    assert official._tokenizer_settings("gpt2", cfg) == {
        "name": "gpt2", "mask_token_id": 50257, "pad_token_id": 50256, "note": "never pad with 50257 (= MASK)",
    }  # fmt: skip
    assert infer_config(meta).n_heads == 1  # no inv_freq: max(1, hidden // 64)


def test_tokenizer_saved_and_pad_never_mask(synthetic, monkeypatch):
    """A loadable tokenizer is saved next to the model; a pad id equal to MASK (the released
    GPT-2 setup) is replaced by eos in both the tokenizer and the config."""

    class FakeTok:
        eos_token, eos_token_id, mask_token_id = "<eos>", 0, 36
        pad_token_id = 36  # = MASK, as the training tokenizer's [PAD]

        def __len__(self):
            return 37

        @property
        def pad_token(self):
            return "[PAD]"

        @pad_token.setter
        def pad_token(self, tok):
            assert tok == self.eos_token
            self.pad_token_id = self.eos_token_id

        def save_pretrained(self, d):
            Path(d, "tokenizer.json").write_text("{}")

    seen = []
    _fake_tokenizer_module(monkeypatch, lambda spec: seen.append(spec) or FakeTok())
    out = convert_official(synthetic["ckpt"], synthetic["tmp"] / "tok_ok", tokenizer="some/tok", max_seq_len=40)
    assert seen == ["some/tok"] and (out / "tokenizer.json").exists() and not (out / "tokenizer_settings.json").exists()
    cfg = EsoLMModel.from_pretrained(out).config
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.mask_token_id) == (0, 0, 36)


def test_infer_config_heads_from_rotary_buffer(synthetic):
    cfg = infer_config(synthetic["raw"])
    assert cfg.n_heads == 3 and cfg.rotary_base == 10000.0 and cfg.mlp_ratio == 4 and cfg.frequency_embedding_size == 256
    with pytest.raises(CheckpointError, match="n_heads=2 contradicts"):
        infer_config(synthetic["raw"], n_heads=2)


def test_cli_main(synthetic, capsys):
    out = synthetic["tmp"] / "cli"
    rc = official.main([str(synthetic["ckpt"]), str(out), "--no-ema", "--tokenizer", "none", "--max-seq-len", "40"])
    text = capsys.readouterr().out
    assert rc == 0 and (out / "model.safetensors").exists()
    assert "global_step 3" in text and "RAW" in text and "fake_omegaconf.DictConfig" in text
    assert f"{sum(v.numel() for k, v in synthetic['raw'].items() if k != 'rotary_emb.inv_freq'):,} parameters" in text
    rc = official.main([str(synthetic["tmp"] / "nope.ckpt"), str(synthetic["tmp"] / "cli2")])
    assert rc == 1 and "nope.ckpt" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. malicious pickles


class _Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint does with ``__reduce__``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker: Path):
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').write('pwned')"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
        "subprocess.check_call": _Payload(subprocess.check_call, ["touch", str(marker)]),
    }


def _malicious_ckpt(tmp: Path, payload, where: str) -> Path:
    sd = {"backbone.vocab_embed.embedding": torch.randn(5, 4)}
    obj = {"state_dict": sd, "global_step": 1}
    if where == "top":
        obj["hyper_parameters"] = {"config": payload}
    else:  # hidden inside the state dict's values
        sd["backbone.evil"] = payload
    path = tmp / f"evil_{uuid.uuid4().hex[:6]}.ckpt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.check_call"])
def test_malicious_payload_never_runs(tmp_path, kind, capsys):
    marker = tmp_path / "pwned"
    path = _malicious_ckpt(tmp_path, _payloads(marker)[kind], "top")
    func_name = kind.split(".")[1]
    with pytest.raises(UnsafeCheckpointError, match=rf"{path.name}.*\.{func_name}"):
        load_official_checkpoint(path)
    assert official.main([str(path), str(tmp_path / "out"), "--tokenizer", "none"]) == 1
    assert func_name in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # and torch's own loader would have run it (the payload is real)
    if kind == "builtins.eval":
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_payload_inside_state_dict_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious_ckpt(tmp_path, _payloads(marker)["os.system"], "state_dict")
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|nt|os)\.system"):
        load_official_checkpoint(path)
    assert not marker.exists()


# Hand-written pickle opcodes (protocol 2 framing; the unpickler accepts later opcodes too).


def _op_str(s: str) -> bytes:  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _op_bytes(b: bytes) -> bytes:  # BINBYTES
    return b"B" + struct.pack("<I", len(b)) + b


def _op_global(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_stack_global(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return _op_str(module) + _op_str(name) + b"\x93"


def _op_call(func: bytes, *args: bytes) -> bytes:  # func(*args): MARK args TUPLE REDUCE
    return func + b"(" + b"".join(args) + b"tR"


def _op_list(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def _op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _op_int(i: int) -> bytes:  # BININT
    return b"J" + struct.pack("<i", i)


def _op_new(module: str, name: str) -> bytes:  # cls.__new__(cls): NEWOBJ of an allowlisted stub class
    return _op_global(module, name) + b")\x81"


_STUB = ("fake_omegaconf", "DictConfig")  # on the converter's stub allowlist


def _pickled(payload: bytes) -> bytes:
    return b"\x80\x04" + payload + b"."


# Stock pickle resolves a dotted global name attribute by attribute from protocol 4 on; a PROTO
# opcode may appear anywhere in the stream, so a hostile payload switches to 4 first.
_PROTO4 = b"\x80\x04"


def _hostile_payloads(marker: Path, module_name: str) -> dict[str, tuple[bytes, str]]:
    """name → (opcodes pushing one object, regex the refusal must match). Each payload that
    names a global, if executed, creates ``marker``; ``module_name`` is an importable module
    (on sys.path during the test) whose import creates it too."""
    m = str(marker)
    touch = _op_str(f"touch {m}")
    py = _op_str(f"open({m!r}, 'w').write('pwned')")
    inner_eval = _pickled(_op_call(_op_global("builtins", "eval"), py))
    tensor_args = (_op_int(0), _op_tuple(_op_int(2)), _op_tuple(_op_int(1)), b"\x89", _op_call(_op_global("collections", "OrderedDict")))
    return {
        # globals refused by name: dotted names, code-running builtins/modules, via GLOBAL, STACK_GLOBAL and INST
        "dotted_global": (_PROTO4 + _op_call(_op_global("torch", "serialization.os.system"), touch), r"torch\.serialization\.os\.system.*'torch'.*'serialization\.os\.system'.*dotted"),
        "dotted_stack_global": (_PROTO4 + _op_call(_op_stack_global("torch", "serialization.os.system"), touch), r"'torch'.*'serialization\.os\.system'.*dotted"),
        "dotted_exec_via_module": (_PROTO4 + _op_call(_op_stack_global("torch.serialization", "pickle.loads"), _op_bytes(inner_eval)), r"torch\.serialization\.pickle\.loads.*dotted"),
        "dotted_allowed_name": (_PROTO4 + _op_call(_op_global("torch", "_utils._rebuild_tensor_v2"), _op_str("x"), *tensor_args), r"torch\._utils\._rebuild_tensor_v2.*dotted"),
        "builtins_exec": (_op_call(_op_global("builtins", "exec"), py), r"builtins\.exec\b.*allowlist"),
        "builtins_eval_stack_global": (_op_call(_op_stack_global("builtins", "eval"), py), r"builtins\.eval\b"),
        "py2_builtin_eval": (_op_call(_op_global("__builtin__", "eval"), py), r"builtins\.eval\b"),
        "builtins_getattr": (
            _op_call(_op_call(_op_global("builtins", "getattr"), _op_call(_op_global("os", "popen")), _op_str("close")), touch),
            r"builtins\.getattr\b",
        ),
        "builtins_import": (_op_call(_op_stack_global("builtins", "__import__"), _op_str(module_name)), r"builtins\.__import__"),
        "os_system": (_op_call(_op_global("os", "system"), touch), r"\bos\.system\b"),
        "posix_system": (_op_call(_op_stack_global("posix", "system"), touch), r"posix\.system"),
        "subprocess_popen": (_op_call(_op_global("subprocess", "Popen"), _op_list(_op_str("touch"), _op_str(m))), r"subprocess\.Popen"),
        "inst_opcode": (b"(" + touch + b"ios\nsystem\n", r"\bos\.system\b"),
        "module_object": (_op_call(_op_global("torch.serialization", "os")), r"torch\.serialization\.os\b"),
        "torch_load_from_bytes": (_op_call(_op_global("torch.storage", "_load_from_bytes"), _op_bytes(inner_eval)), r"torch\.storage\._load_from_bytes"),
        "copyreg_reconstructor": (_op_call(_op_global("copyreg", "_reconstructor"), _op_global("os", "system"), b"N", b"N"), r"copyreg\._reconstructor"),
        # allowed callables given hostile arguments
        "rebuild_tensor_non_storage": (_op_call(_op_global("torch._utils", "_rebuild_tensor_v2"), touch, *tensor_args), r"_rebuild_tensor_v2 got a builtins\.str instead of a storage"),
        "rebuild_tensor_stub_storage": (_op_call(_op_global("torch._utils", "_rebuild_tensor_v2"), _op_new(*_STUB), *tensor_args), r"_rebuild_tensor_v2 got an instance of the stubbed class fake_omegaconf\.DictConfig"),
        "rebuild_from_type_not_a_rebuilder": (
            _op_call(_op_global("torch._tensor", "_rebuild_from_type_v2"), _op_global("builtins", "dict"), _op_global("torch", "Tensor"), _op_tuple(), b"}"),
            r"_rebuild_from_type_v2 got the global builtins\.dict as its rebuild function",
        ),
        "ordered_dict_stub_iterable": (_op_call(_op_global("collections", "OrderedDict"), _op_new(*_STUB)), r"collections\.OrderedDict got an instance of the stubbed class"),
        "ordered_dict_callable_item": (
            _op_call(_op_global("collections", "OrderedDict"), _op_list(_op_tuple(_op_str("k"), _op_global("torch._utils", "_rebuild_tensor_v2")))),
            r"collections\.OrderedDict got the global torch\._utils\._rebuild_tensor_v2",
        ),
        "defaultdict_stub_factory": (_op_call(_op_global("collections", "defaultdict"), _op_global(*_STUB)), r"defaultdict got the stubbed class fake_omegaconf\.DictConfig as its factory"),
        "set_of_stubs": (_op_call(_op_global("builtins", "set"), _op_list(_op_new(*_STUB))), r"builtins\.set got an instance of the stubbed class"),
        "codecs_base64": (_op_call(_op_global("_codecs", "encode"), _op_str("abc"), _op_str("base64")), r"_codecs\.encode with encoding 'base64'"),
        "str_rot13": (_op_call(_op_global("builtins", "str"), _op_bytes(b"x"), _op_str("rot13")), r"builtins\.str with encoding 'rot13'"),
        "build_on_allowed_callable": (
            _op_global("torch._utils", "_rebuild_tensor_v2") + b"}" + _op_str("__defaults__") + b"N" + b"s" + b"b",
            r"modify torch\._utils\._rebuild_tensor_v2",
        ),
        "build_on_stub_class": (_op_global(*_STUB) + b"N}" + _op_str("__iter__") + _op_global("builtins", "list") + b"s\x86b", r"modify the stubbed class fake_omegaconf\.DictConfig"),
        "torch_tensor_called": (_op_call(_op_global("torch", "Tensor"), touch), r"calls torch\.Tensor"),
    }


_HOSTILE_NAMES = list(_hostile_payloads(Path("m"), "mod"))


class _SplicingPickleModule:
    """A ``pickle_module`` for ``torch.save`` that writes the checkpoint the way torch does
    (zip or legacy, real tensors and storages) but replaces each placeholder string with
    hand-written opcodes."""

    __name__ = "splicing_pickle"

    def __init__(self, splices: dict[str, bytes]):
        self.splices = splices
        outer = self

        class Pickler(pickle.Pickler):
            def __init__(self, file, protocol=None, **kw):
                self._real_file = file
                self._buf = io.BytesIO()
                super().__init__(self._buf, protocol, **kw)

            def dump(self, obj):
                super().dump(obj)
                self._real_file.write(outer.splice(self._buf.getvalue()))

        self.Pickler = Pickler

    def splice(self, data: bytes) -> bytes:
        for key, payload in self.splices.items():
            needle = _op_str(key)
            if needle in data:
                assert data.count(needle) == 1
                data = data.replace(needle, payload)
        return data

    @staticmethod
    def dump(obj, f, protocol=None):
        pickle.dump(obj, f, protocol=protocol)


def _spliced_ckpt(path: Path, payload: bytes, where: str, fmt: str) -> Path:
    """A Lightning-style checkpoint (raw weights, EMA list, config) with ``payload`` at
    ``where``: ``config`` (hyper_parameters), ``ema`` (inside shadow_params) or
    ``state_dict`` (inside a list in a dict among the state dict's values)."""
    key = "__ESORL_PAYLOAD__"
    sd = {"backbone.vocab_embed.embedding": torch.randn(5, 4), "backbone.sigma_map.mlp.0.weight": torch.randn(4, 8)}
    ema = [torch.randn(5, 4), torch.randn(4, 8)]
    obj = {"state_dict": sd, "ema": {"decay": 0.9, "num_updates": 1, "shadow_params": ema}, "global_step": 1,
           "hyper_parameters": {"config": {"learning_rate": 1e-4}}}  # fmt: skip
    if where == "config":
        obj["hyper_parameters"]["config"]["evil"] = key
    elif where == "ema":
        ema.insert(1, key)
    else:
        sd["backbone.extra"] = {"nested": [torch.zeros(1), key]}
    torch.save(obj, path, pickle_module=_SplicingPickleModule({key: payload}), _use_new_zipfile_serialization=fmt == "zip")
    return path


@pytest.fixture
def hostile_env(tmp_path, monkeypatch):
    """``(marker, payloads)``: an importable module whose import would create the marker."""
    marker = tmp_path / "pwned"
    mod = f"esorl_pwn_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker, _hostile_payloads(marker, mod)
    sys.modules.pop(mod, None)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("where", ["config", "ema", "state_dict"])
@pytest.mark.parametrize("name", _HOSTILE_NAMES)
def test_hostile_pickle_refused(tmp_path, hostile_env, capsys, name, where, fmt):
    """Each hand-written payload, wherever it sits, in either file format: refused with a
    message naming the global or the problem, ``main`` returns 1, nothing runs."""
    marker, payloads = hostile_env
    payload, pattern = payloads[name]
    path = _spliced_ckpt(tmp_path / f"{name}.ckpt", payload, where, fmt)
    with pytest.raises(CheckpointError, match=rf"(?s){name}\.ckpt.*{pattern}"):
        load_official_checkpoint(path)
    assert official.main([str(path), str(tmp_path / "out"), "--tokenizer", "none"]) == 1
    assert re.search(pattern, capsys.readouterr().err, re.S)
    assert not (tmp_path / "out").exists()
    time.sleep(0.05 if "popen" in name else 0)  # a Popen that had run would touch asynchronously
    assert not marker.exists()


def test_hostile_payloads_are_real(tmp_path, hostile_env):
    """The by-name payloads do what they claim under the stock unpickler (so their refusal
    is what keeps the marker away): a few, run in this process."""
    marker, payloads = hostile_env
    for name in ("dotted_global", "dotted_stack_global", "dotted_exec_via_module", "builtins_exec", "builtins_import", "torch_load_from_bytes"):
        assert not marker.exists()
        with contextlib.suppress(Exception):  # the payload's return value may not be picklable data
            pickle.loads(_pickled(payloads[name][0]))
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_hostile_pickle_refused_by_cli_process(tmp_path, hostile_env, fmt):
    """``python -m esorl.convert.official`` exits non-zero and names the global."""
    marker, payloads = hostile_env
    name = "dotted_global" if fmt == "zip" else "builtins_exec"
    path = _spliced_ckpt(tmp_path / "evil.ckpt", payloads[name][0], "ema", fmt)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run(
        [sys.executable, "-m", "esorl.convert.official", str(path), str(tmp_path / "out"), "--tokenizer", "none"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert re.search(payloads[name][1], r.stderr, re.S), r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_legacy_header_payload_refused(tmp_path, hostile_env):
    """A legacy-format file whose first pickle (torch's magic number) is the payload."""
    marker, payloads = hostile_env
    for name in ("dotted_stack_global", "builtins_exec"):
        path = tmp_path / f"{name}_header.ckpt"
        path.write_bytes(_pickled(payloads[name][0]) + b"\x80\x02N.")
        with pytest.raises(UnsafeCheckpointError, match=payloads[name][1]):
            load_official_checkpoint(path)
        assert official.main([str(path), str(tmp_path / "out"), "--tokenizer", "none"]) == 1
    assert not marker.exists()


def test_release_config_and_tokenizer_classes_are_stubbed(tmp_path):
    """The globals a real release pickles for its OmegaConf config (incl. the
    ``defaultdict(dict)`` resolver cache) and transformers GPT-2 tokenizer load as inert
    stubs; their modules are never imported."""
    dc, meta = _op_new("omegaconf.dictconfig", "DictConfig"), _op_new("omegaconf.base", "ContainerMetadata")
    cache = _op_call(_op_global("collections", "defaultdict"), _op_global("builtins", "dict"))
    config = (
        dc + b"}(" + _op_str("_metadata") + meta
        + b"}(" + _op_str("ref_type") + _op_global("typing", "Any") + _op_str("object_type") + _op_global("__builtin__", "dict")
        + _op_str("key_type") + _op_global("__builtin__", "long") + _op_str("resolver_cache") + cache + b"ub"
        + _op_str("_content") + b"}(" + _op_str("lr") + _op_new("omegaconf.nodes", "AnyNode") + b"u" + b"ub"
    )  # fmt: skip
    tok = (
        _op_new("transformers.models.gpt2.tokenization_gpt2_fast", "GPT2TokenizerFast")
        + b"}(" + _op_str("_tokenizer") + _op_global("tokenizers", "Tokenizer") + b"(" + _op_new("tokenizers.models", "Model") + b"t\x81"
        + _op_call(_op_global("_codecs", "encode"), _op_str('{"version": "1.0"}'), _op_str("latin1")) + b"b"
        + _op_str("eos") + _op_global("tokenizers", "AddedToken") + b"(" + _op_str("<|endoftext|>") + b"t\x81" + b"ub"
    )  # fmt: skip
    path = tmp_path / "release.ckpt"
    obj = {"state_dict": {"backbone.vocab_embed.embedding": torch.ones(3, 2)}, "hyper_parameters": {"config": "__C__", "tokenizer": "__T__"}}
    torch.save(obj, path, pickle_module=_SplicingPickleModule({"__C__": config, "__T__": tok}))
    ck = load_official_checkpoint(path)
    assert set(ck["stubbed_globals"]) == {
        "omegaconf.dictconfig.DictConfig", "omegaconf.base.ContainerMetadata", "omegaconf.nodes.AnyNode", "typing.Any",
        "transformers.models.gpt2.tokenization_gpt2_fast.GPT2TokenizerFast", "tokenizers.Tokenizer",
        "tokenizers.models.Model", "tokenizers.AddedToken",
    }  # fmt: skip
    assert "omegaconf" not in sys.modules  # (tokenizers itself is imported by transformers)
    loaded = torch.load(path, weights_only=False, pickle_module=official.restricted_pickle_module())
    cfg = loaded["hyper_parameters"]["config"]
    assert isinstance(cfg, official.StubObject) and cfg._stub_name == "DictConfig"
    assert type(cfg._stub_state["_metadata"]._stub_state["resolver_cache"]) is collections.defaultdict


def test_importable_class_code_never_runs(tmp_path):
    """An allowlisted config class whose module *is* importable is stubbed: its module is not
    imported and its ``__setstate__`` never runs. An importable class that is not on the
    allowlist is refused (not imported), unless the caller adds it with ``allow_stubs``."""
    marker = tmp_path / "ran"
    names, (cfg_obj, _) = _throwaway_objects(tmp_path, marker, config=("fake_omegaconf", "DictConfig"))
    other, (other_cfg, _) = _throwaway_objects(tmp_path, marker)
    ok, refused = tmp_path / "importable.ckpt", tmp_path / "unknown_class.ckpt"
    torch.save({"state_dict": {"backbone.vocab_embed.embedding": torch.ones(3, 2)}, "hyper_parameters": {"config": cfg_obj}}, ok)
    torch.save({"state_dict": {"backbone.vocab_embed.embedding": torch.ones(3, 2)}, "hyper_parameters": {"config": other_cfg}}, refused)
    for n in names + other:
        sys.modules.pop(n, None)
    sys.path.insert(0, str(tmp_path))  # the modules stay importable during the loads
    try:
        ck = load_official_checkpoint(ok)
        with pytest.raises(UnsafeCheckpointError, match=rf"{other[0]}\.TrainConfig.*allowlist"):
            load_official_checkpoint(refused)
        ck2 = load_official_checkpoint(refused, allow_stubs=[f"{other[0]}.TrainConfig"])
        assert not (set(names) | set(other)) & set(sys.modules), "the checkpoint's module was imported"
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists()
    assert "fake_omegaconf.DictConfig" in ck["stubbed_globals"] and f"{other[0]}.TrainConfig" in ck2["stubbed_globals"]
    for bad in (["os.system"], ["builtins.eval"], ["torch.serialization.os"], ["nodots"], ["a.b-c"]):
        with pytest.raises(ValueError, match="allow_stubs"):
            load_official_checkpoint(ok, allow_stubs=bad)


def test_restricted_unpickler_direct():
    """The unpickler on its own: plain data passes, allowlisted classes become inert recorded
    stubs, anything else is refused by module and name."""
    data = pickle.dumps({"a": [1, 2.5, (3, "x")], "b": {1, 2}, "c": b"\x00\xff", "e": b"", "f": frozenset([3]), "g": bytearray(b"z"), "h": 1 + 2j}, protocol=2)
    obj = official.RestrictedUnpickler(io.BytesIO(data)).load()
    assert obj == {"a": [1, 2.5, (3, "x")], "b": {1, 2}, "c": b"\x00\xff", "e": b"", "f": frozenset([3]), "g": bytearray(b"z"), "h": 1 + 2j}
    stub_data = _pickled(b"}(" + _op_str("d") + _op_new(*_STUB) + _op_str("t") + _op_global("typing", "Any") + b"u")
    up = official.RestrictedUnpickler(io.BytesIO(stub_data))
    obj = up.load()
    assert isinstance(obj["d"], official.StubObject) and obj["d"]._stub_name == "DictConfig"
    assert up.stubbed_globals == ["fake_omegaconf.DictConfig", "typing.Any"]
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|nt)\.getcwd \(module '(posix|nt)', name 'getcwd'\)"):
        official.RestrictedUnpickler(io.BytesIO(pickle.dumps(_Payload(os.getcwd), protocol=2))).load()
    for module, name in (("torch", "serialization.os.system"), ("builtins", "exec"), ("torch", "load"), ("torch.storage", "_load_from_bytes")):
        with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{module}.{name} (module {module!r}, name {name!r})")):
            official.RestrictedUnpickler(io.BytesIO(b"")).find_class(module, name)
    # _codecs.encode is allowed only as pickle uses it for bytes
    evil = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x06\x00\x00\x00base64q\x02\x86q\x03Rq\x04."
    with pytest.raises(UnsafeCheckpointError, match="_codecs.encode"):
        official.RestrictedUnpickler(io.BytesIO(evil)).load()


# ----------------------------------------------------------------------------- 4. errors


def test_error_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        load_official_checkpoint(tmp_path / "nothere.ckpt")


def test_error_text_file(tmp_path):
    p = tmp_path / "notes.ckpt"
    p.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.ckpt.*not a readable PyTorch checkpoint"):
        load_official_checkpoint(p)


def test_error_no_state_dict(tmp_path):
    p = tmp_path / "weights_only.ckpt"
    torch.save({"model": {"w": torch.ones(2)}, "global_step": 1}, p)
    with pytest.raises(CheckpointError, match=r"weights_only.ckpt has no 'state_dict'.*model"):
        load_official_checkpoint(p)
    p2 = tmp_path / "list.ckpt"
    torch.save([torch.ones(2)], p2)
    with pytest.raises(CheckpointError, match="list.ckpt.*list"):
        load_official_checkpoint(p2)


def test_error_ema_mismatch(tmp_path, synthetic):
    raw = synthetic["raw"]
    order = ref.reference_parameter_order(2)
    shadow = [synthetic["ema"][n] for n in order]
    p = tmp_path / "short_ema.ckpt"
    torch.save({"state_dict": {"backbone." + k: v for k, v in raw.items()}, "ema": {"decay": 0.9, "num_updates": 1, "shadow_params": shadow[:-1]}}, p)
    with pytest.raises(CheckpointError, match=r"short_ema.ckpt: ema.shadow_params has 29 tensors but the backbone has 30"):
        load_official_checkpoint(p)
    swapped = list(shadow)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(CheckpointError, match="EMA entry 0 has shape"):
        ema_state_dict(raw, swapped)
    # no EMA at all: converting with EMA fails clearly, --no-ema works
    p2 = tmp_path / "no_ema.ckpt"
    torch.save({"state_dict": {"backbone." + k: v for k, v in raw.items()}}, p2)
    with pytest.raises(CheckpointError, match="no_ema.ckpt has no 'ema'"):
        convert_official(p2, tmp_path / "o", tokenizer=None)
    assert not (tmp_path / "o").exists()


def test_error_wrong_architecture(tmp_path, synthetic):
    raw = dict(synthetic["raw"])
    del raw["blocks.1.mlp.2.bias"]
    p = tmp_path / "broken.ckpt"
    torch.save({"state_dict": {"backbone." + k: v for k, v in raw.items()}}, p)
    with pytest.raises(CheckpointError, match=r"(?s)broken.ckpt.*blocks.1.mlp.2.bias"):
        convert_official(p, tmp_path / "o", use_ema=False, tokenizer=None)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))
