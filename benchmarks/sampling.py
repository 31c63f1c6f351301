"""Sampling speed: KV-cached vs no-cache (``replay``, same trajectory) vs MDLM-style (issue 3).

Same model, same prompts, same trajectory ``(σ, k)`` (unified schedule, α0 = 1 by default)
and the same pre-drawn noise for the three samplers of :func:`esorl.sampling.generate`, so
they emit the same tokens (the ``same tok`` column checks it) and differ only in cost.
Token-forwards per sample (docs/ESOLM.md §4 b), computed from the actual step sizes ``k_1..k_K``:

* cached:  ``P + 2N − k_K`` (every token once as a query, once as a clean copy, except the
  last step's tokens, which are only queried);
* static (the default sampler, eager on CPU): a fixed window of ``W = max_i (k_{i−1} + k_i)``
  slots every step after the first, ``P + k_1 + (K − 1)·W``, traded for static shapes;
* no-cache replay: ``Σ_i (P + c_{i−1} + k_i)`` with ``c_{i−1} = k_1 + … + k_{i−1}``;
* MDLM-style: ``K·(P + N)``.

Each row prints the measured speed-up of the cached sampler over that method beside the
token-forward ratio; target (issue 3): measured ≥ 0.6 × token ratio at N = 256, T = N.
Peak memory of each sampler is measured in separate runs after the timings.

    PYTHONPATH=. python benchmarks/sampling.py --device cpu --quick
    python benchmarks/sampling.py --device cuda --out benchmarks/results/sampling-h100.json
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

METHODS = ("cache", "static", "replay", "mdlm")


def token_forwards(step_sizes, P: int, N: int) -> dict:
    """Token-forwards per sample of each sampler for step sizes ``k_1..k_K`` (docs/ESOLM.md §4 b)."""
    ks = [int(k) for k in step_sizes]
    K = len(ks)
    replay, c = 0, 0
    for k in ks:
        replay += P + c + k
        c += k
    assert c == N, (c, N)
    # the static sampler forwards a fixed window of W = max(k_(i-1) + k_i) slots per step
    W = max((ks[i - 1] + ks[i] for i in range(1, K)), default=0)
    return {"cache": P + 2 * N - ks[-1], "static": P + ks[0] + (K - 1) * W, "replay": replay, "mdlm": K * (P + N)}


def make_inputs(model, B: int, P: int, N: int, alpha0: float, T: int, seed: int, device):
    """Prompts ``(B, P)`` (full length, random ids), a unified ``(α0, T)`` trajectory and
    uniforms, all from one seeded generator."""
    from esorl.schedule import ScheduleConfig

    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    pid = torch.randint(0, V - 1, (B, P), generator=gen).to(device)
    pm = torch.ones(B, P, dtype=torch.bool, device=device)
    traj = ScheduleConfig(kind="unified", alpha0=alpha0, num_steps=T).sample(B, N, gen)
    u = torch.rand(B, N, generator=gen, dtype=torch.float64)
    return pid, pm, traj, u


def run_sampler(model, inputs, N: int, method: str, backend: str = "auto"):
    from esorl.sampling import generate

    pid, pm, traj, u = inputs
    return generate(model, pid, pm, N, traj, uniforms=u, method=method, backend=backend)


def measure_config(model, device, B: int, P: int, N: int, T: int, alpha0: float, methods, repeats: int, warmup: int,
                   seed: int, backend: str) -> dict:
    """Time each method on one (N, T) configuration; returns a dict per method plus the
    trajectory's step sizes and token-forward counts."""
    inputs = make_inputs(model, B, P, N, alpha0, T, seed, device)
    sizes = inputs[2].step_sizes.tolist()
    tf = token_forwards(sizes, P, N)
    out = {"N": N, "T": T, "P": P, "B": B, "alpha0": alpha0, "K": len(sizes), "k_last": sizes[-1], "step_sizes": sizes,
           "token_forwards_per_sample": tf, "methods": {}}
    ref_tokens = None
    for m in methods:
        t = timeit(lambda: run_sampler(model, inputs, N, m, backend), device, warmup=warmup, repeats=repeats)
        roll = t["result"]
        r = public(t)
        r["ms_per_step"] = 1e3 * t["median_s"] / len(sizes)
        if ref_tokens is None:
            ref_tokens = roll.completion_ids
        r["same_tokens_frac"] = float((roll.completion_ids == ref_tokens).float().mean())
        out["methods"][m] = r
        log(f"  N={N} T={T} K={len(sizes)} {m}: {fmt_time(t['median_s'])}")
    return out


def measure_memory(model, device, cfg: dict, methods, seed: int, backend: str) -> None:
    """Peak memory of one run of each method (after all timings: see common.PeakMemory)."""
    inputs = make_inputs(model, cfg["B"], cfg["P"], cfg["N"], cfg["alpha0"], cfg["T"], seed, device)
    for m in methods:
        with PeakMemory(device) as mem:
            run_sampler(model, inputs, cfg["N"], m, backend)
        cfg["methods"][m]["peak_bytes"] = mem.peak_bytes
        cfg["methods"][m]["peak_kind"] = mem.kind


def rows_for(cfg: dict, target_at: tuple[int, int] | None) -> list[list]:
    tf = cfg["token_forwards_per_sample"]
    ms = cfg["methods"]
    base = ms.get("cache")
    rows = []
    for m, r in ms.items():
        tok_ratio = tf[m] / tf["cache"]
        speed = r["median_s"] / base["median_s"] if base else None
        frac = speed / tok_ratio if speed is not None else None
        r.update(token_ratio=tok_ratio, speedup_of_cache=speed, speedup_over_token_ratio=frac)
        is_target = target_at is not None and (cfg["N"], cfg["T"]) == target_at and m in ("replay", "mdlm") and base is not None
        r["target_met"] = (frac >= 0.6) if is_target else None
        target = "-" if not is_target else ("yes" if frac >= 0.6 else "NO")
        rows.append([cfg["N"], cfg["T"], cfg["K"], m, tf[m], fmt_time(r["median_s"]), f"{r['ms_per_step']:.2f}",
                     fmt_x(speed), fmt_x(tok_ratio), f"{frac:.2f}" if frac is not None else "-", target,
                     f"{100 * r['same_tokens_frac']:.1f}%", fmt_bytes(r.get("peak_bytes"))])
    return rows


COLUMNS = ["N", "T", "K", "method", "tok/sample", "time", "ms/step", "cache speed-up", "token ratio", "meas/tok",
           ">=0.6?", "same tok", "peak mem"]
NOTES = [
    "cache speed-up = time(method) / time(cache) (median of repeats); token ratio = token-forwards(method) / token-forwards(cache)",
    "token-forwards per sample (spec 4b): cache P + 2N - k_K; replay sum_i (P + c_(i-1) + k_i); mdlm K (P + N)",
    "target (issue 3): meas/tok >= 0.6 at N = 256, T = N; same tok = share of tokens equal to the cached sampler's",
    "peak mem: cuda max_memory_allocated / cpu sampled RSS growth (approximate) of one run, above the start",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "sampling.json")
    p.add_argument("--quick", action="store_true", help="CPU smoke size: tiny model, batch 4, one repeat")
    p.add_argument("--size", default=None, choices=["tiny", "cpu", "small"], help="default: small on cuda, tiny on cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--ns", default="64,256", help="completion lengths N")
    p.add_argument("--ts", default="8,32,N", help="step budgets T ('N' = T equal to N)")
    p.add_argument("--sampling-alpha0", type=float, default=1.0, help="sampling α0")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--backend", default="auto", choices=["auto", "sdpa", "flex"])
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        size, B, P, repeats = "small", 64, 32, 3
    elif args.quick:
        size, B, P, repeats = "tiny", 4, 16, 1
    else:
        size, B, P, repeats = "tiny", 8, 32, 2
    size = args.size or size
    B = args.batch or B
    P = args.prompt_len if args.prompt_len is not None else P
    repeats = args.repeats or repeats
    ns = [int(n) for n in args.ns.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    model = make_model(size, device, dtype, seed=args.seed, max_seq_len=max(1024, P + max(ns))).eval()
    log(f"sampling: size={size} ({count_params(model) / 1e6:.1f} M params), batch {B}, prompt {P}, alpha0 {args.sampling_alpha0}, "
        f"device {device}, {dtype_name(dtype)}, backend {args.backend}, {repeats} repeat(s), warm-up {args.warmup}")
    configs = []
    t0 = time.perf_counter()
    for N in ns:
        for t in args.ts.split(","):
            T = N if t.strip().upper() == "N" else int(t)
            if any(c["N"] == N and c["T"] == T for c in configs):
                continue
            configs.append(measure_config(model, device, B, P, N, T, args.sampling_alpha0, methods, repeats, args.warmup, args.seed, args.backend))
    if not args.no_memory:
        for cfg in configs:
            measure_memory(model, device, cfg, [m for m in methods if m in ("cache", "replay")], args.seed, args.backend)
    target_at = (256, 256) if 256 in ns else None
    rows = [r for cfg in configs for r in rows_for(cfg, target_at)]
    title = (f"Sampling, {size} model, batch {B}, prompt {P}, alpha0 {args.sampling_alpha0}, {device} {dtype_name(dtype)} "
             f"(same trajectory and noise for every method)")
    table = print_table(title, COLUMNS, rows, NOTES)
    write_json(args.out, {
        "benchmark": "sampling", "size": size, "batch": B, "prompt_len": P, "alpha0": args.sampling_alpha0, "dtype": dtype_name(dtype),
        "backend": args.backend, "repeats": repeats, "warmup": args.warmup, "quick": args.quick,
        "model": dict(model.config.to_dict(), n_params=count_params(model)), "configs": configs,
        "target": "speed-up >= 0.6 x token ratio at N = 256, T = N", "elapsed_s": time.perf_counter() - t0, "table": table,
    }, device)
    return configs


if __name__ == "__main__":
    main()
