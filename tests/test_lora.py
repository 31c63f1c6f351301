"""LoRA through peft on the Eso-LM (esorl.lora), and the Hugging Face bits TRL relies on:
``AutoModelForCausalLM`` resolves an Eso-LM directory, the model has a generation config,
``unwrap`` finds the Eso-LM inside a ``PeftModel``."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GenerationConfig

from esorl import EsoLMModel
from esorl.attention import build_mask
from esorl.layout import exact_layout, trajectory_table
from esorl.likelihood import exact
from esorl.lora import DEFAULT_TARGET_REGEX, default_lora_target_modules, lora_config, merge_and_export
from esorl.modeling_esolm import model_config, unwrap
from esorl.rollout import Rollout
from esorl.schedule import ScheduleConfig

from conftest import random_prompts, tiny_model


def _rollout(model, B=3, N=8, seed=0) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    pid, pm = random_prompts(B, 5, model_config(model).vocab_size, gen)
    traj = ScheduleConfig(alpha0=0.5, num_steps=3).sample(B, N, gen)
    comp = torch.randint(5, model_config(model).vocab_size - 1, (B, N), generator=gen)
    return Rollout.from_tokens(pid, pm, comp, traj)


def _inputs(model, seed=0):
    """Layout (a) of a rollout with a real Eso-LM mask: ``(ids, positions, mask, query slice)``."""
    ro = _rollout(model, seed=seed)
    t = trajectory_table(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.order, ro.steps, ro.completion_mask)
    lay, qs = exact_layout(t, ro.prompt_ids.shape[1], model_config(model).mask_token_id)
    return lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), qs


def _peft(dtype=torch.float64, r=4, nonzero=True, std=0.3, **kw):
    """``(base copy, peft model)``; with ``nonzero`` every adapter matrix is random (a fresh
    adapter's B is 0, which would make every comparison trivial)."""
    base = tiny_model(layers=2, dtype=dtype, std=std)
    ref = copy.deepcopy(base)
    pm = get_peft_model(base, lora_config(r=r, lora_alpha=2 * r, **kw))
    if nonzero:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return ref, pm


def _logits(model, inputs):
    ids, pos, mask, qs = inputs
    with torch.no_grad():
        return model(ids, pos, mask, logits_slice=qs)


def test_default_targets():
    model = tiny_model(layers=3)
    names = default_lora_target_modules(model)
    assert names == [f"blocks.{i}.{s}" for i in range(3) for s in ("attn_qkv", "attn_out", "mlp.0", "mlp.2")]
    _, pm = _peft(nonzero=False)
    # the regex default of lora_config targets exactly these modules, and the names are still
    # found through the peft wrapper (LoRA layers keep them)
    adapted = sorted({n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in pm.named_parameters() if ".lora_A." in n})
    assert adapted == sorted(default_lora_target_modules(pm)) == sorted(default_lora_target_modules(tiny_model(layers=2)))
    assert lora_config().target_modules == DEFAULT_TARGET_REGEX
    with pytest.raises(TypeError):
        default_lora_target_modules(torch.nn.Linear(2, 2))


def test_only_adapters_train():
    ref, pm = _peft(dtype=torch.float32, lora_dropout=0.1)
    assert isinstance(pm, PeftModel) and pm.peft_config["default"].task_type is None
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter offered
    pm.train()
    lp, valid = exact(pm, _rollout(pm))  # the single-pass likelihood through the wrapper
    (-(lp * valid).sum()).backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_disabled_adapter_is_the_base_model_exactly():
    ref, pm = _peft()
    inputs = _inputs(ref)
    base = _logits(ref, inputs)
    assert not torch.equal(_logits(pm, inputs), base)  # the adapter acts
    with pm.disable_adapter():
        assert torch.equal(_logits(pm, inputs), base)
    assert not torch.equal(_logits(pm, inputs), base)


# float32 on weights of std 0.1 (logits |z| < 2): merging rounds W + BA once per weight, the
# adapted model rounds x·W and x·A·B apart: ~1e-6 seen (with std 0.3, |z| ~ 15: up to 5e-5)
@pytest.mark.parametrize("dtype,std,atol", [(torch.float64, 0.3, 1e-10), (torch.float32, 0.1, 1e-5)])
def test_merged_export_equals_base_plus_adapter(tmp_path, dtype, std, atol):
    ref, pm = _peft(dtype=dtype, std=std)
    inputs = _inputs(ref)
    adapted = _logits(pm, inputs)
    out = merge_and_export(pm, tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(out.glob("adapter_*"))  # a plain Eso-LM directory, no peft files
    merged = EsoLMModel.from_pretrained(out, dtype=dtype)
    assert type(merged) is EsoLMModel
    assert set(merged.state_dict()) == set(ref.state_dict())
    got = _logits(merged, inputs)
    fin = torch.isfinite(adapted)
    assert torch.equal(fin, torch.isfinite(got))
    assert (got[fin] - adapted[fin]).abs().max() < atol
    # the default merges a copy: the peft model still has its adapters and gives the same logits
    assert torch.equal(_logits(pm, inputs), adapted)
    # in place: same weights, the wrapper is consumed
    merge_and_export(pm, tmp_path / "in_place", in_place=True)
    again = EsoLMModel.from_pretrained(tmp_path / "in_place", dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), merged.state_dict().values()))


def test_merge_and_export_refuses_a_plain_model(tmp_path):
    with pytest.raises(TypeError, match="PeftModel"):
        merge_and_export(tiny_model(), tmp_path / "x")


def test_exact_likelihood_through_peft():
    ref, pm = _peft()
    ro = _rollout(ref)
    assert unwrap(pm) is pm.base_model.model and isinstance(unwrap(pm), EsoLMModel)
    assert model_config(pm) is pm.base_model.model.config
    wrapped = torch.nn.Module()
    wrapped.module = pm  # DDP / DeepSpeed around peft
    assert unwrap(wrapped) is unwrap(pm)
    lp, valid = exact(pm, ro)
    with pm.disable_adapter():
        lp0, _ = exact(pm, ro)
    assert torch.equal(lp0, exact(ref, ro)[0])
    assert (lp - lp0).abs().max() > 1e-3
    # against the explicitly merged weights
    merged = copy.deepcopy(pm).merge_and_unload()
    assert (exact(merged, ro)[0] - lp).abs().max() < 1e-10


@pytest.mark.parametrize("reentrant", [True, False])
def test_lora_with_gradient_checkpointing(reentrant):
    """What TRL runs (PEFT + ZeRO-3 forces reentrant checkpointing): frozen embeddings, so the
    blocks' input gets requires_grad from transformers' input hook; adapter gradients equal."""
    _, pm = _peft()
    ro = _rollout(pm)

    def adapter_grads():
        pm.train()
        pm.zero_grad(set_to_none=True)
        lp, valid = exact(pm, ro)
        (-(lp * valid).sum()).backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    plain = adapter_grads()
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert unwrap(pm).is_activation_checkpointing
    ckpt = adapter_grads()
    assert plain.keys() == ckpt.keys() and len(plain) == 16
    assert max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) < 1e-10


# ----------------------------------------------------------------------------- Hugging Face bits


def test_auto_model_for_causal_lm_and_generation_config(tmp_path):
    model = tiny_model()
    assert isinstance(model.generation_config, GenerationConfig)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)
    assert model.generation_config.bos_token_id is None  # tiny_model sets none
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64)
    assert type(loaded) is EsoLMModel
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
    assert (loaded.generation_config.eos_token_id, loaded.generation_config.pad_token_id) == (2, 0)
    assert loaded.config._name_or_path == str(tmp_path / "m")  # what TRL rebuilds the reference from
    again = AutoModelForCausalLM.from_pretrained(loaded.config._name_or_path, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sd.values()))
