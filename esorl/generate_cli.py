"""``esorl sample`` and ``esorl score``: generate from a saved Eso-LM, and score a rollout
under every likelihood estimator."""

from __future__ import annotations

import argparse

import torch


def _load(model_dir: str, device: str, dtype: str):
    from esorl import EsoLMModel
    from esorl.data import load_tokenizer

    model = EsoLMModel.from_pretrained(model_dir).to(device=device, dtype=getattr(torch, dtype)).eval()
    return model, load_tokenizer(model_dir)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--model", required=True, help="a save_pretrained directory (esorl pretrain/sft/grpo output, or convert-official)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch; default: one empty prompt)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--alpha0", type=float, default=1.0, help="sampling α0 (1 = pure diffusion, 0 = left-to-right AR)")
    p.add_argument("--steps", type=int, default=8, help="diffusion steps T of the unified schedule")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    return p


def _generate(a):
    from esorl.policy import EsoPolicy
    from esorl.sampling import SamplingConfig
    from esorl.schedule import ScheduleConfig

    model, tok = _load(a.model, a.device, a.dtype)
    prompts = [p for p in (a.prompt or [""]) for _ in range(a.num_samples)]
    s = SamplingConfig(a.max_new_tokens, ScheduleConfig(alpha0=a.alpha0, num_steps=a.steps), a.temperature, a.top_k, a.top_p)
    pol = EsoPolicy(model, tok, s)
    ro = pol.generate(prompts, a.seed, 0, torch.arange(len(prompts)))
    return model, tok, pol, prompts, ro


def main(argv=None):
    a = _parser("esorl sample").parse_args(argv)
    _, _, pol, prompts, ro = _generate(a)
    for p, t, lp in zip(prompts, pol.texts(ro), ro.logp_behaviour.sum(1).tolist()):
        print(f"{p}|{t}    (log p(trajectory) = {lp:.2f}, {len(ro.step_sizes)} steps)")


def score_main(argv=None):
    p = _parser("esorl score")
    p.add_argument("--estimators", default="exact,replay,mc_elbo,one_step,coupled")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--per-token", action="store_true", help="print per-token log-probs too")
    a = p.parse_args(argv)
    from esorl.likelihood import estimate

    model, tok, pol, prompts, ro = _generate(a)
    texts = pol.texts(ro)
    print(f"sampler (behaviour) log-probs, total: {[round(x, 3) for x in ro.logp_behaviour.sum(1).tolist()]}")
    for name in a.estimators.split(","):
        kw = {"n": a.mc_samples, "alpha0": a.alpha0, "seed": a.seed} if name == "mc_elbo" else ({"seed": a.seed} if name in ("one_step", "coupled") else {})
        with torch.no_grad():
            lp, valid = estimate(model, ro, name, **kw)
        print(f"{name:>9}: total {[round(x, 3) for x in (lp * valid).sum(1).tolist()]}")
        if a.per_token:
            for b, t in enumerate(texts):
                toks = tok.convert_ids_to_tokens(ro.completion_ids[b].tolist())
                print("           " + " ".join(f"{w}:{v:.2f}" for w, v in zip(toks, lp[b].tolist())))
