"""The model against the reference implementation's numbers, layout consistency, rotary
positions under permutation, and save / load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from esorl import EsoLMConfig, EsoLMModel
from esorl.attention import FULL, build_mask
from esorl.layout import exact_layout, one_copy_layout, replay_layout, sequential_layout, sorted_table, trajectory_table
from esorl.sampling import generate
from esorl.schedule import Trajectory

from conftest import FIXTURES, need_fixtures, random_prompts, tiny_model

SAMPLER_CASES = ["sampler_mixed", "sampler_bigfirst", "sampler_ones", "sampler_alpha0", "prompt"]


def reference_model(dtype=torch.float32):
    cfg = json.loads((FIXTURES / "config.json").read_text())
    m = EsoLMModel(EsoLMConfig(vocab_size=cfg["vocab_size"], mask_token_id=cfg["mask_id"], hidden_size=cfg["hidden_size"],
                               n_layers=cfg["n_blocks"], n_heads=cfg["n_heads"], cond_dim=cfg["cond_dim"], max_seq_len=cfg["length"]))
    m.load_state_dict(load_file(FIXTURES / "weights.safetensors"), strict=True)
    return m.to(dtype).eval()


def _case(C, name):
    x, sig, ks = C[name + "_x"], C[name + "_sigma"], C[name + "_step_sizes"]
    P = 8 if name == "prompt" else 0
    if P:
        ks = ks[1:]  # the fixture's first step is the prompt itself (spec: prompt = step 0)
    traj = Trajectory(sig[:, P:] - P, ks)
    return x[:, :P], x[:, P:], traj, P


@pytest.mark.parametrize("name", SAMPLER_CASES)
def test_reference_sampler_cases_exact_layout(name):
    """Layout (a) (one pass) reproduces the reference KV-cached sampler's logits."""
    need_fixtures()
    C = load_file(FIXTURES / "cases.safetensors")
    model = reference_model()
    prompt, comp, traj, P = _case(C, name)
    table = trajectory_table(prompt, torch.ones_like(prompt, dtype=torch.bool), comp, traj.order, traj.steps_by_position())
    lay, qs = exact_layout(table, P, 100)
    with torch.no_grad():
        lg = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), logits_slice=qs, raw_logits=True)
    out = torch.empty_like(lg).scatter_(1, traj.order[..., None].expand_as(lg), lg)
    assert (out - C[name + "_logits"][:, P:]).abs().max() < 1e-4


@pytest.mark.parametrize("name", SAMPLER_CASES)
def test_reference_sampler_cases_kv_cached_sampler(name):
    """esorl's KV-cached samplers (mask-per-window and static-shape), teacher-forced, record
    the reference log-probs."""
    need_fixtures()
    C = load_file(FIXTURES / "cases.safetensors")
    model = reference_model()
    prompt, comp, traj, P = _case(C, name)
    for method in ("cache", "static"):
        r = generate(model, prompt, torch.ones_like(prompt, dtype=torch.bool), comp.shape[1], traj, teacher_tokens=comp, method=method, backend="sdpa")
        assert torch.equal(r.completion_ids, comp)
        assert (r.logp_model - C[name + "_logprobs"][:, P:]).abs().max() < 1e-4, method


def test_reference_training_layouts():
    """Layouts (d) and (e) reproduce the reference diffusion- and sequential-phase forwards."""
    need_fixtures()
    C = load_file(FIXTURES / "cases.safetensors")
    model = reference_model()
    for name in ("diffusion", "sequential"):
        x = C[f"{name}_x"]
        z = C["diffusion_zt" if name == "diffusion" else "sequential_z0"]
        si = C[f"{name}_sort_idx"]
        B, L = x.shape
        masked = z == 100
        pos = torch.arange(L).expand(B, L)
        key = torch.empty_like(si).scatter_(1, si, pos.clone())
        table, sidx = sorted_table(x, pos, torch.ones_like(masked), masked.long(), key)
        assert torch.equal(sidx, si)
        with torch.no_grad():
            if name == "diffusion":
                lay = one_copy_layout(table, table.steps == 1, 100)
                lg = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), raw_logits=True)
                out = torch.empty_like(lg).scatter_(1, sidx[..., None].expand_as(lg), lg)
                err = (out - C["diffusion_logits"])[masked].abs().max()
            else:
                table.steps = torch.where(table.steps == 1, table.steps.cumsum(1), 0)
                lay, q_idx, q_valid = sequential_layout(table, 100)
                lg = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), logits_slice=slice(L, None), raw_logits=True)
                posq = table.positions.gather(1, q_idx)
                ref = C["sequential_logits"].gather(1, posq[..., None].expand_as(lg))
                err = (lg - ref)[q_valid].abs().max()
        assert err < 1e-4, (name, err)


def _one_step_three_ways(model, gen, dtype):
    """Conditionals of step 2 of a trajectory through layouts (a), (c) and (d)."""
    B, N = 3, 8
    pid, pm = random_prompts(B, 4, 40, gen, min_len=4)  # equal lengths: (d) needs no padding
    order = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    traj = Trajectory(order, torch.tensor([3, 4, 1]))
    comp = torch.randint(5, 39, (B, N), generator=gen)
    table = trajectory_table(pid, pm, comp, order, traj.steps_by_position())
    P = pid.shape[1]
    with torch.no_grad():
        lay, qs = exact_layout(table, P, 39)
        a = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), logits_slice=qs, raw_logits=True)[:, 3:7]
        lay, qs = replay_layout(table, P + 3, P + 3, P + 7, 39)
        c = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), logits_slice=qs, raw_logits=True)
        # (d): clean = prompt + step-1 tokens (same rank order), masked = step-2 tokens in σ order
        sub = trajectory_table(pid, pm, comp, order, traj.steps_by_position())
        sub.ids, sub.positions, sub.valid = sub.ids[:, : P + 7], sub.positions[:, : P + 7], sub.valid[:, : P + 7]
        sub.steps = (torch.arange(P + 7) >= P + 3).long().expand(B, -1)
        lay = one_copy_layout(sub, sub.steps == 1, 39)
        d = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), raw_logits=True)[:, P + 3 :]
    return a, c, d


def test_layouts_a_c_d_agree():
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = tiny_model(dtype=dtype)
        a, c, d = _one_step_three_ways(model, torch.Generator().manual_seed(0), dtype)
        assert (a - c).abs().max() < tol and (a - d).abs().max() < tol, ((a - c).abs().max(), (a - d).abs().max())


def test_rotary_follows_tokens_under_permutation():
    """Shuffling the array slots of layout (a) (with their positions and descriptors) leaves
    every token's logits unchanged: nothing assumes array order = position order."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    pid, pm = random_prompts(2, 4, 40, gen)
    order = torch.stack([torch.randperm(7, generator=gen) for _ in range(2)])
    traj = Trajectory(order, torch.tensor([2, 3, 2]))
    table = trajectory_table(pid, pm, torch.randint(5, 39, (2, 7), generator=gen), order, traj.steps_by_position())
    lay, qs = exact_layout(table, pid.shape[1], 39)
    with torch.no_grad():
        ref = model(lay.ids, lay.positions, build_mask(lay.desc, lay.desc, "sdpa"), raw_logits=True)
        perm = torch.randperm(len(lay), generator=gen)
        from esorl.attention import TokenDesc

        d = TokenDesc(*(t[:, perm] for t in lay.desc.astuple()))
        out = model(lay.ids[:, perm], lay.positions[:, perm], build_mask(d, d, "sdpa"), raw_logits=True)
    valid = lay.desc.valid[:, perm]
    assert (out - ref[:, perm])[valid].abs().max() < 1e-10
    # and positions matter (rotary is relative, so scale them: a uniform shift changes nothing)
    with torch.no_grad():
        shifted = model(lay.ids, lay.positions * 2, build_mask(lay.desc, lay.desc, "sdpa"), raw_logits=True)
    assert (shifted - ref)[lay.desc.valid].abs().max() > 1e-3


def test_save_load_roundtrip(tmp_path):
    import transformers

    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 39, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    for loaded in (EsoLMModel.from_pretrained(tmp_path), transformers.AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, EsoLMModel)
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(model(ids, pos, FULL), loaded(ids, pos, FULL))
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "esolm"


def test_context_overflow_is_an_error():
    model = tiny_model(context=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long), torch.arange(9)[None], FULL)
