"""Likelihood estimators' cost: ``exact`` vs ``replay`` vs ``mc_elbo(n=4)`` vs ``one_step``
(and ``coupled``) vs a plain causal forward over ``P + N`` (issue 3).

Same model, same batch of rollouts (random completions along a unified α0 = 1 trajectory
with ``T`` steps; the cost of an estimator does not depend on the token values). Each row is
one estimator's per-token log-probs of the whole batch, forward only (``torch.no_grad``), or
forward + backward of ``Σ log p`` with ``--backward``. Times are compared with the *plain
forward*: a causal forward of the same ``P + N`` tokens, no copies, logits of the N
completion tokens read one position earlier (how an AR model scores a completion).

Token-forwards per sample (docs/ESOLM.md §6): plain ``P + N``; exact ``P + 2N``; replay
``Σ_i (P + c_{i−1} + k_i)``; mc_elbo ``n·(P + N)`` (α0 = 1); one_step ``P + N``; coupled
``3·(P + N)``. Target (issues 3 and 6): ``exact`` ≤ 2.3 × the plain forward.

    PYTHONPATH=. python benchmarks/likelihood.py --device cpu --quick
    python benchmarks/likelihood.py --device cuda --out benchmarks/results/likelihood-h100.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    PeakMemory, add_common_args, count_params, dtype_name, fmt_bytes, fmt_time, fmt_x, log, make_model,
    print_table, public, resolve_device, resolve_dtype, setup_threads, timeit, write_json,
)

import torch  # noqa: E402

from esorl.likelihood import REGISTRY  # noqa: E402

ESTIMATORS = ("plain",) + tuple(REGISTRY)  # the default set measured: a plain forward and every registered estimator


def make_rollout(model, B: int, P: int, N: int, T: int, alpha0: float, seed: int, device):
    """A batch of rollouts with random prompts and completions along a unified (α0, T)
    trajectory, as the sampler would record it (no sampling needed for a cost benchmark)."""
    from esorl.rollout import Rollout
    from esorl.schedule import ScheduleConfig

    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    traj = ScheduleConfig(kind="unified", alpha0=alpha0, num_steps=T).sample(B, N, gen)
    comp = torch.randint(0, V - 1, (B, N), generator=gen)
    r = Rollout(
        prompt_ids=torch.randint(0, V - 1, (B, P), generator=gen), prompt_mask=torch.ones(B, P, dtype=torch.bool),
        completion_ids=comp, order=traj.order, step_sizes=traj.step_sizes, steps=traj.steps_by_position(),
        completion_mask=torch.ones(B, N, dtype=torch.bool), text_mask=torch.ones(B, N, dtype=torch.bool),
        sample_ids=torch.arange(B),
    )
    r.validate(model.config.max_seq_len)
    return r.to(device)


def plain_forward(model, rollout, backend: str = "auto"):
    """Causal forward of ``[prompt | completion]`` in position order, no copies; log-probs of
    the completion tokens from the logits one position earlier. Returns ``(logp, valid)``."""
    from esorl.attention import TokenDesc, build_mask
    from esorl.likelihood import _prompt_completion
    from esorl.logprobs import token_logprobs

    ids, pos, valid = _prompt_completion(rollout)
    B, L = ids.shape
    P = rollout.prompt_ids.shape[1]
    rank = torch.arange(L, device=ids.device).expand(B, L)
    desc = TokenDesc(torch.zeros_like(rank), rank, torch.zeros_like(valid), valid)
    sl = slice(P - 1, L - 1) if P > 0 else slice(0, L)
    logits = model(ids, pos, build_mask(desc, desc, backend), logits_slice=sl)
    return token_logprobs(logits, rollout.completion_ids, rollout.temperature), rollout.completion_mask


def estimator_fn(name: str, backend: str, n_mc: int = 4, p_mask: float = 0.15):
    """``plain`` (one ordinary forward, the baseline) or any estimator of the registry, with
    its keyword arguments from the registry (α0 = 1, seed 0)."""
    from esorl import likelihood as lk
    from esorl.policy import EstimatorConfig

    if name == "plain":
        return lambda m, r: plain_forward(m, r, backend)
    try:
        est = lk.get_estimator(name)
    except ValueError as e:
        raise SystemExit(f"{e} (or plain)") from None
    kw = est.kwargs(EstimatorConfig(name, n_mc, p_mask), 1.0, 0)
    return lambda m, r: est.fn(m, r, backend=backend, **kw)


def token_forwards(name: str, step_sizes, P: int, N: int, n_mc: int = 4) -> int:
    """Token forwards of one sequence: ``P + N`` for ``plain``, else the registry's cost model."""
    from esorl import likelihood as lk
    from esorl.policy import EstimatorConfig

    if name == "plain":
        return P + N
    est = lk.get_estimator(name)
    return est.forwards(P, N, [int(k) for k in step_sizes], est.kwargs(EstimatorConfig(name, n_mc), 1.0, 0))


def make_call(model, rollout, fn, backward: bool):
    def call():
        if backward:
            model.zero_grad(set_to_none=True)
            lp, v = fn(model, rollout)
            (lp * v).sum().backward()
            return lp.detach()
        with torch.no_grad():
            lp, _ = fn(model, rollout)
        return lp

    return call


def measure(model, rollout, names, device, backend: str = "auto", repeats: int = 3, warmup: int = 1, backward: bool = False,
            n_mc: int = 4, memory: bool = True) -> dict:
    """Time each estimator on the same rollouts; ratios vs ``plain`` when it is measured."""
    P, N = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    sizes = rollout.step_sizes.tolist()
    res = {}
    for name in names:
        call = make_call(model, rollout, estimator_fn(name, backend, n_mc), backward)
        t = timeit(call, device, warmup=warmup, repeats=repeats)
        res[name] = public(t)
        res[name]["token_forwards_per_sample"] = token_forwards(name, sizes, P, N, n_mc)
        res[name]["finite"] = bool(torch.isfinite(t["result"]).all())
        log(f"  {name}{' (fwd+bwd)' if backward else ''}: {fmt_time(t['median_s'])}")
    if memory:
        for name in names:
            call = make_call(model, rollout, estimator_fn(name, backend, n_mc), backward)
            with PeakMemory(device) as m:
                call()
            res[name]["peak_bytes"], res[name]["peak_kind"] = m.peak_bytes, m.kind
    base = res.get("plain")
    for name, r in res.items():
        r["token_ratio"] = r["token_forwards_per_sample"] / (P + N)
        r["time_ratio"] = r["median_s"] / base["median_s"] if base else None
    return res


def rows_for(res: dict, mode: str) -> list[list]:
    rows = []
    for name, r in res.items():
        tr = r["time_ratio"]
        target = ("yes" if tr <= 2.3 else "NO") if name == "exact" and tr is not None else "-"
        rows.append([name, mode, r["token_forwards_per_sample"], fmt_time(r["median_s"]), fmt_x(tr), fmt_x(r["token_ratio"]),
                     f"{tr / r['token_ratio']:.2f}" if tr is not None else "-", target, fmt_bytes(r.get("peak_bytes"))])
    return rows


COLUMNS = ["estimator", "mode", "tok/sample", "time", "vs plain", "token ratio", "meas/tok", "<=2.3x?", "peak mem"]
NOTES = [
    "vs plain = time / time of a plain causal forward over P + N (same tokens, no copies); median of repeats",
    "token ratio = token-forwards / (P + N): exact (P + 2N), replay sum_i (P + c_(i-1) + k_i), mc_elbo n (P + N), "
    "one_step 1, coupled 3",
    "target (issues 3, 6): exact <= 2.3x the plain forward; peak mem: cuda max_memory_allocated / cpu sampled RSS growth",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "likelihood.json")
    p.add_argument("--quick", action="store_true", help="CPU smoke size: tiny model, batch 4, P 16, N 64, 3 repeats")
    p.add_argument("--size", default=None, choices=["tiny", "cpu", "small"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="completion length N")
    p.add_argument("--T", type=int, default=32, help="steps of the unified alpha0 = 1 trajectory (replay runs K <= T forwards)")
    p.add_argument("--likelihood", default=",".join(ESTIMATORS), help="comma list of estimators (esorl.likelihood.REGISTRY)")
    p.add_argument("--mc-samples", type=int, default=4)
    p.add_argument("--backward", action="store_true", help="also time forward + backward of sum(log p)")
    p.add_argument("--backend", default="auto", choices=["auto", "sdpa", "flex"])
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        size, B, P, N, repeats = "small", 16, 128, 896, 5
    elif args.quick:
        size, B, P, N, repeats = "tiny", 4, 16, 64, 3
    else:
        size, B, P, N, repeats = "tiny", 8, 32, 224, 3
    size = args.size or size
    B, N = args.batch or B, args.n or N
    P = args.prompt_len if args.prompt_len is not None else P
    repeats = args.repeats or repeats
    names = [e.strip() for e in args.likelihood.split(",") if e.strip()]
    model = make_model(size, device, dtype, seed=args.seed, max_seq_len=max(1024, P + N)).eval()
    rollout = make_rollout(model, B, P, N, args.T, 1.0, args.seed, device)
    log(f"likelihood: size={size} ({count_params(model) / 1e6:.1f} M params), batch {B}, P {P}, N {N}, "
        f"T {args.T} (K = {len(rollout.step_sizes)}), {device} {dtype_name(dtype)}, backend {args.backend}, {repeats} repeat(s)")
    t0 = time.perf_counter()
    results = {"forward": measure(model, rollout, names, device, args.backend, repeats, args.warmup, False, args.mc_samples, not args.no_memory)}
    if args.backward:
        if dtype == torch.bfloat16 or dtype == torch.float16:
            log("  note: --backward with half-precision weights (no master copy): timing only")
        results["forward+backward"] = measure(model, rollout, names, device, args.backend, repeats, args.warmup, True, args.mc_samples, not args.no_memory)
    rows = [r for mode, res in results.items() for r in rows_for(res, mode)]
    title = f"Likelihood estimators, {size} model, batch {B}, P {P}, N {N}, K {len(rollout.step_sizes)} steps, {device} {dtype_name(dtype)}"
    table = print_table(title, COLUMNS, rows, NOTES)
    write_json(args.out, {
        "benchmark": "likelihood", "size": size, "batch": B, "prompt_len": P, "n": N, "T": args.T, "K": len(rollout.step_sizes),
        "dtype": dtype_name(dtype), "backend": args.backend, "repeats": repeats, "quick": args.quick, "mc_samples": args.mc_samples,
        "model": dict(model.config.to_dict(), n_params=count_params(model)), "results": results,
        "target": "exact <= 2.3 x plain forward", "elapsed_s": time.perf_counter() - t0, "table": table,
    }, device)
    return results


if __name__ == "__main__":
    main()
