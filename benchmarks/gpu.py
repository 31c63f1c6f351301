"""All of issue 6's GPU measurements in one script, under 4 minutes on an H100/H200.

1. Correctness on the GPU path first (float32, small random model): the static sampler with
   CUDA graphs (several graphs: small cache buckets) emits the same tokens as without graphs,
   as the mask-per-window KV-cached sampler and as the no-cache one; ``exact`` equals
   ``replay`` (≤ 1e-4) and the sampler's recorded log-probs; flex agrees with SDPA on layout
   (a) (first case only: flex compiles per shape).
2. Speed, with random weights, on the small model of docs/ESOLM.md §9 (12 blocks, 768 hidden, 12 heads,
   vocab 50258), bf16 weights for sampling and scoring, bf16 autocast over float32 weights
   for training (as ``esorl pretrain``), batch 64, L = 1024:

   * KV-cached sampling (the default: static shapes + CUDA graphs; whole calls timed, the
     first one, with the graph captures, reported beside) α0 = 1 with T = 1024 and T = 128;
     α0 = 0.125 with T = 1024; pure AR (α0 = 0: one BOS-like prompt token, 1023 steps); no
     prompt otherwise (P = 0, N = 1024); side by side, the mask-per-window sampler
     (``method="cache"``) and the static one without graphs, stopped and extrapolated;
   * MDLM-style sampling without cache, T = 1024: measured on its first steps and
     extrapolated per forward (said so in the output);
   * a hybrid training step (α0 = 0.125, κ = 0.5, batch 16 × 1024, fwd + bwd + clip + AdamW +
     EMA) and an MDM-only one, side by side, then one profiled step of each (top ops);
   * single-pass ``exact`` of 64 rollouts (P = 128, N = 896) vs one plain causal forward of
     the same batch.

3. Diagnostics: the same KV-cached sampler with the SDPA backend and cuDNN attention off
   (``sample_a1_T1024_sdpa_nocudnn``), and where a cached step's time goes (``breakdown``:
   mask building, model forward, token picking, Python). On request (``--sections``): more
   SDPA variants and ``attn_micro`` (one attention call per backend, first call vs again).

Every section is guarded (an error is recorded and the next section runs), runs under the
time left (``--budget-s``, counted from process start; sections run most important first
and those that no longer fit are skipped; a sampler that would run past its section's cap is
stopped and its total extrapolated from the steps it made, flagged EXTRAPOLATED), and the
JSON is rewritten after every section, so a run cut short keeps what it measured. Each
sampling section first runs a few steps of the same trajectory untimed (compilation).

    python benchmarks/gpu.py                                   # cuda, small model
    python benchmarks/gpu.py --sections correctness,sample_a1_T1024 --budget-s 120
    PYTHONPATH=. python benchmarks/gpu.py --device cpu --size tiny    # the CPU smoke run (< 1 min)
"""

from __future__ import annotations

_T_START = __import__("time").perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as _dt  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    RESULTS, PeakMemory, StepProbe, StopSampling, card_slug, count_params, device_name, extrapolate, fmt_bytes,
    fmt_time, fmt_x, log, make_model, print_table, resolve_device, setup_threads, sync, write_json,
)

import torch  # noqa: E402

# issue 6: the reference implementation on one H100 80GB HBM3 (random weights, small model,
# bf16, batch 64, L = 1024), and the targets for esorl on the same card
REFERENCE_CARD = "NVIDIA H100 80GB HBM3 (reference implementation, issue 6)"
REFERENCE = {
    "sample_a1_T1024": dict(what="KV-cached sampling a0=1, T=1024", ref_s=20.8, ref_ms_step=31.6, target_s=2.0),
    "sample_a1_T128": dict(what="KV-cached sampling a0=1, T=128", ref_s=3.76),
    "sample_a0125_T1024": dict(what="KV-cached sampling a0=0.125, T=1024", ref_s=29.9, target_s=3.5),
    "sample_ar": dict(what="AR with KV cache (a0=0), 1023 steps", ref_s=22.7, ref_ms_step=22.2, target_s=2.5),
    "mdlm_T1024": dict(what="MDLM-style, no cache, T=1024", ref_s=69.0, ref_ms_step=109.0),
    "train_hybrid": dict(what="train step hybrid a0=0.125 k=0.5, 16x1024", ref_s=0.280, target_s=0.140),
    "train_mdm": dict(what="train step MDM-only, 16x1024", ref_s=0.142),
    "sample_a1_T1024_sdpa": dict(what="KV-cached a0=1, T=1024, SDPA backend", ref_s=20.8, ref_ms_step=31.6, target_s=2.0),
    "sample_a1_T1024_sdpa_nocudnn": dict(what="KV-cached a0=1, T=1024, SDPA without cuDNN", ref_s=20.8, ref_ms_step=31.6, target_s=2.0),
    "sample_a0125_T1024_sdpa_nocudnn": dict(what="KV-cached a0=0.125, T=1024, SDPA without cuDNN", ref_s=29.9, target_s=3.5),
    "sample_ar_sdpa_nocudnn": dict(what="AR with KV cache, SDPA without cuDNN", ref_s=22.7, ref_ms_step=22.2, target_s=2.5),
    "sample_a1_T128_sdpa_nocudnn": dict(what="KV-cached a0=1, T=128, SDPA without cuDNN", ref_s=3.76),
    "sample_a1_T1024_cache": dict(what="mask-per-window KV-cached a0=1, T=1024", ref_s=20.8, ref_ms_step=31.6, target_s=2.0),
    "sample_a1_T1024_static_eager": dict(what="static sampler a0=1, T=1024, no CUDA graphs", ref_s=20.8, ref_ms_step=31.6, target_s=2.0),
    "sample_ar_cache": dict(what="mask-per-window KV-cached AR, 1023 steps", ref_s=22.7, ref_ms_step=22.2, target_s=2.5),
}
HF_BAR = "transformers generate, GPT-2-sized, batch 64, 1023 tokens, bf16, H100: 52.7 s default cache, 12.4 s static, 2.48 s static + compile"

#: problem sizes. ``small`` = issue 6; ``tiny`` = the CPU smoke run.
SHAPES = {
    "small": dict(model="small", B=64, N=1024, T_big=1024, T_small=128, train_B=16, train_L=1024, exact_B=64, exact_P=128,
                  exact_N=896, warm_steps=12, mdlm_steps=24, train_repeats=5, exact_repeats=5),
    "tiny": dict(model="tiny", B=4, N=64, T_big=64, T_small=8, train_B=4, train_L=64, exact_B=4, exact_P=8, exact_N=56,
                 warm_steps=4, mdlm_steps=8, train_repeats=3, exact_repeats=3),
}
#: the correctness model (float32, all sizes): small, but with the real head_dim (64)
CORRECTNESS_MODEL = dict(vocab_size=1000, hidden_size=128, n_layers=2, n_heads=2, cond_dim=32, max_seq_len=256)

#: section -> (default time cap in s on the small size, least time worth starting it, compile
#: group). ``torch._dynamo.reset()`` runs whenever the group changes, so each group pays for,
#: and reports in its warm-up / first-step times, its own compilation. Sampling sections in a
#: row share one compiled state, like a long-running sampler: esorl compiles flex with
#: ``dynamic=False``, every decoding step has new shapes, so the first steps use up dynamo's
#: recompile limit (8 shapes) and later steps run flex eagerly. Training, exact and MDLM have
#: fixed shapes, compiled once.
SECTIONS = {
    "correctness": (60, 15, "correctness"),
    "sample_a1_T1024": (30, 12, "sampler"),
    "train": (60, 25, "train"),
    "train_flex": (60, 40, "train"),
    "exact": (30, 10, "exact"),
    "sample_ar": (20, 8, "sampler"),
    "sample_a0125_T1024": (20, 8, "sampler"),
    "sample_a1_T128": (15, 6, "sampler"),
    "mdlm_T1024": (15, 6, "mdlm"),
    "sample_a1_T1024_sdpa_nocudnn": (15, 6, "sdpa"),
    "sample_a1_T1024_cache": (12, 6, "sdpa"),
    "sample_a1_T1024_static_eager": (12, 6, "sdpa"),
    "sample_ar_cache": (10, 6, "sdpa"),
    "breakdown": (15, 6, "sampler"),
    # on request (--sections): more SDPA variants and the attention micro-benchmark
    "sample_a1_T1024_sdpa": (25, 10, "sdpa"),
    "sample_a0125_T1024_sdpa_nocudnn": (25, 10, "sdpa"),
    "sample_ar_sdpa_nocudnn": (25, 10, "sdpa"),
    "sample_a1_T128_sdpa_nocudnn": (15, 8, "sdpa"),
    "attn_micro": (40, 10, "micro"),
}
#: sections run by default, in this order (most important first: the budget skips the tail)
DEFAULT_SECTIONS = ["correctness", "sample_a1_T1024", "sample_ar", "sample_a0125_T1024", "sample_a1_T128", "train",
                    "sample_a1_T1024_cache", "exact", "train_flex", "sample_a1_T1024_static_eager", "sample_ar_cache", "mdlm_T1024"]


class Ctx:
    """What sections share: device, shapes, models (built lazily), args."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.shape = SHAPES[args.size]
        self._m32 = self._m16 = None

    @property
    def model32(self):
        """float32 weights (training: autocast to bf16 on CUDA, as ``esorl pretrain``)."""
        if self._m32 is None:
            t0 = time.perf_counter()
            self._m32 = make_model(self.shape["model"], self.device, torch.float32, seed=self.args.seed, dropout=0.1)
            log(f"  built {self.shape['model']} model ({count_params(self._m32) / 1e6:.1f} M params) in {time.perf_counter() - t0:.1f} s")
        return self._m32

    @property
    def model16(self):
        """The same weights in the sampling dtype (bf16 on CUDA, float32 on CPU), eval mode."""
        if self._m16 is None:
            self._m16 = copy.deepcopy(self.model32).to(self.args.sample_dtype).eval()
        return self._m16


# ----------------------------------------------------------------------------- sections


def sec_correctness(ctx: Ctx, deadline: float) -> dict:
    """Cached vs no-cache tokens (float32), exact vs replay, exact vs sampler, flex vs SDPA."""
    from esorl.sampling import left_pad

    dev = ctx.device
    ctx.deadline = deadline
    model = make_model(CORRECTNESS_MODEL, dev, torch.float32, seed=ctx.args.seed + 1, std=0.08).eval()
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(ctx.args.seed + 1)
    B, N = 4, 24
    lens = [3, 12, 7, 1]  # prompts of mixed length (left padding exercised)
    pid, pm = left_pad([torch.randint(5, V - 1, (n,), generator=gen).tolist() for n in lens], 0, dev)
    checks, ok = [], True
    import torch._dynamo.config as dcfg

    # compile a few step shapes, run the rest through eager flex: both paths are checked, and
    # the check does not spend a minute compiling
    key = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    old_limit = getattr(dcfg, key)
    setattr(dcfg, key, 4)
    try:
        return _correctness_checks(ctx, model, pid, pm, gen, B, N, checks, ok)
    finally:
        setattr(dcfg, key, old_limit)


def _correctness_checks(ctx, model, pid, pm, gen, B, N, checks, ok):
    from esorl.attention import flex_available
    from esorl.likelihood import exact, replay
    from esorl.sampling import generate
    from esorl.schedule import ScheduleConfig

    dev = ctx.device
    deadline = ctx.deadline
    import functools

    import esorl.sampling as smp
    from esorl.static_sampling import static_decode

    for alpha0, T in ((1.0, 6), (1.0, 24), (0.125, 4), (0.0, 1)):
        if time.perf_counter() > deadline:
            checks.append(dict(alpha0=alpha0, T=T, skipped="time budget"))
            continue
        traj = ScheduleConfig(alpha0=alpha0, num_steps=T).sample(B, N, gen)
        u = torch.rand(B, N, generator=gen, dtype=torch.float64)
        # flex (compiled per shape: slow to start) is compared with SDPA on the first case only
        first = alpha0 == 0.0  # the last case
        kw = dict(uniforms=u, temperature=0.9, backend="auto" if first else "sdpa")
        t0 = time.perf_counter()
        a = generate(model, pid, pm, N, traj, method="cache", **kw)
        b = generate(model, pid, pm, N, traj, method="replay", **kw)
        # the static sampler as the default runs it (CUDA graphs on GPU), with small cache
        # buckets so that several graphs are captured and replayed on this small problem
        orig = smp.static_decode
        smp.static_decode = functools.partial(static_decode, bucket=8)
        try:
            c = generate(model, pid, pm, N, traj, method="static", **kw)
            c_eager = generate(model, pid, pm, N, traj, method="static", cuda_graphs=False, **kw)
        finally:
            smp.static_decode = orig
        mism_static = int((a.completion_ids != c.completion_ids).sum())
        mism_graph_eager = int((c.completion_ids != c_eager.completion_ids).sum())
        d_static_lp = float((a.logp_model - c.logp_model).abs().max())
        mism = int((a.completion_ids != b.completion_ids).sum())
        with torch.no_grad():
            e, _ = exact(model, a, backend=kw["backend"])
            rp, _ = replay(model, a, backend=kw["backend"])
            e_sdpa, _ = exact(model, a, backend="sdpa")
            e_flex, _ = exact(model, a, backend="flex") if first else (e_sdpa, None)  # CPU: eager flex (forward only)
        d_exact_replay = float((e - rp).abs().max())
        d_exact_sampler = float((e - a.logp_model.to(e.dtype)).abs().max())
        d_cache_replay_lp = float((a.logp_model - b.logp_model).abs().max())
        d_backend = float((e_flex - e_sdpa).abs().max())
        passed = (mism == 0 and mism_static == 0 and mism_graph_eager == 0 and d_static_lp <= 1e-4 and d_exact_replay <= 1e-4
                  and d_exact_sampler <= 1e-4 and d_backend <= 1e-4)
        ok &= passed
        checks.append(dict(alpha0=alpha0, T=T, K=len(traj.step_sizes), token_mismatches=mism, tokens=B * N,
                           static_vs_cache_token_mismatches=mism_static, static_graph_vs_eager_token_mismatches=mism_graph_eager,
                           max_abs_static_minus_cache_logp=d_static_lp,
                           max_abs_exact_minus_replay=d_exact_replay, max_abs_exact_minus_sampler=d_exact_sampler,
                           max_abs_cache_minus_replay_logp=d_cache_replay_lp, max_abs_exact_flex_minus_sdpa=d_backend,
                           passed=passed, seconds=time.perf_counter() - t0))
        log(f"  a0={alpha0} T={T}: token mismatches cache/replay {mism}, static/cache {mism_static}, graph/eager {mism_graph_eager} "
            f"of {B * N}, |static-cache| logp {d_static_lp:.2e}, |exact-replay| {d_exact_replay:.2e}, "
            f"|exact-sampler| {d_exact_sampler:.2e}, |flex-sdpa| {d_backend:.2e} -> {'PASS' if passed else 'FAIL'}")
    done = [c for c in checks if "skipped" not in c]
    return dict(passed=ok and bool(done), complete=len(done) == len(checks), checks_run=len(done), checks_total=len(checks),
                checks=checks, dtype="float32", backend_auto="flex" if flex_available(dev) else "sdpa", tolerance=1e-4)


def _sample(ctx: Ctx, deadline: float, alpha0: float, T: int, P: int, N: int, method: str = "static", backend: str = "auto",
            max_steps: int | None = None, cuda_graphs: bool | None = None) -> dict:
    from sampling import make_inputs, token_forwards

    from esorl.sampling import generate

    dev, B = ctx.device, ctx.shape["B"]
    model = ctx.model16
    pid, pm, traj, u = make_inputs(model, B, P, N, alpha0, T, ctx.args.seed, dev)
    sizes = traj.step_sizes.tolist()
    K = len(sizes)
    tf = token_forwards(sizes, P, N)
    if method == "static" and (cuda_graphs if cuda_graphs is not None else dev.type == "cuda"):
        # CUDA graphs: steps cannot be timed one by one (a sync would break the capture), so
        # whole calls are timed: the first (graph capture, kernel set-up) and the next ones
        calls = []
        with PeakMemory(dev) as mem:
            while True:
                sync(dev)
                t0 = time.perf_counter()
                generate(model, pid, pm, N, traj, uniforms=u, method="static", cuda_graphs=True)
                sync(dev)
                calls.append(time.perf_counter() - t0)
                if len(calls) >= 3 or time.perf_counter() + calls[-1] > deadline:
                    break
        total = min(calls[1:]) if len(calls) > 1 else calls[0]
        how = "measured" if len(calls) > 1 else "measured (first call only, capture included)"
        log(f"  static+graphs a0={alpha0} T={T}: K={K} steps, calls {', '.join(f'{c:.2f}' for c in calls)} s -> {total:.2f} s")
        return dict(alpha0=alpha0, T=T, P=P, N=N, B=B, method="static", cuda_graphs=True, backend="auto", K=K, steps_measured=K,
                    completed=True, measured_s=total, total_s=total, how=how, ms_per_step=1e3 * total / K, calls_s=calls,
                    first_call_s=calls[0], token_forwards_per_sample=tf["cache"], token_forwards_all_methods=tf,
                    tokens_per_s=B * tf["cache"] / total, peak_bytes=mem.peak_bytes, peak_kind=mem.kind, step_sizes=sizes)

    def run(probe):
        probe.start()
        t0 = time.perf_counter()
        try:
            generate(probe, pid, pm, N, traj, uniforms=u, method=method, backend=backend, cuda_graphs=False)
            done = True
        except StopSampling:
            done = False
        sync(dev)
        return done, time.perf_counter() - t0

    warm = min(ctx.shape["warm_steps"], K)
    _, warm_s = run(StepProbe(model, dev, max_steps=warm))
    log(f"  warm-up: {warm} steps in {warm_s:.1f} s (compilation included)")
    probe = StepProbe(model, dev, max_steps=max_steps, deadline=deadline, min_steps=min(8, K))
    with PeakMemory(dev) as mem:
        done, wall = run(probe)
    m = len(probe.step_times)
    total, how = (wall, "measured") if done else extrapolate(probe.step_times, K)
    tok = tf["cache" if method in ("cache", "static") else method]
    log(f"  {method} a0={alpha0} T={T}: K={K} steps, {m} run in {wall:.2f} s -> total {total:.2f} s ({how})")
    return dict(alpha0=alpha0, T=T, P=P, N=N, B=B, method=method, backend=backend, K=K, steps_measured=m, completed=done,
                measured_s=wall, total_s=total, how=how, ms_per_step=1e3 * total / K, warmup_steps=warm, warmup_s=warm_s,
                token_forwards_per_sample=tok, token_forwards_all_methods=tf, tokens_per_s=B * tok / total,
                peak_bytes=mem.peak_bytes, peak_kind=mem.kind, step_sizes=sizes,
                step_times_ms=[round(1e3 * t, 3) for t in probe.step_times])


def sec_sample_a1_T1024(ctx, deadline):
    return _sample(ctx, deadline, 1.0, ctx.shape["T_big"], 0, ctx.shape["N"])


def sec_sample_a1_T128(ctx, deadline):
    return _sample(ctx, deadline, 1.0, ctx.shape["T_small"], 0, ctx.shape["N"])


def sec_sample_a0125_T1024(ctx, deadline):
    return _sample(ctx, deadline, 0.125, ctx.shape["T_big"], 0, ctx.shape["N"])


def sec_sample_ar(ctx, deadline):
    return _sample(ctx, deadline, 0.0, 1, 1, ctx.shape["N"] - 1)


def sec_mdlm_T1024(ctx, deadline):
    r = _sample(ctx, deadline, 1.0, ctx.shape["T_big"], 0, ctx.shape["N"], method="mdlm", max_steps=ctx.shape["mdlm_steps"])
    if not r["completed"]:
        r["how"] += "; MDLM measured on its first steps only, extrapolated per forward"
    return r


def sec_sample_a1_T1024_cache(ctx, deadline):
    """The mask-per-window KV-cached sampler (``method="cache"``), side by side."""
    return _sample(ctx, deadline, 1.0, ctx.shape["T_big"], 0, ctx.shape["N"], method="cache", backend="sdpa")


def sec_sample_ar_cache(ctx, deadline):
    return _sample(ctx, deadline, 0.0, 1, 1, ctx.shape["N"] - 1, method="cache", backend="sdpa")


def sec_sample_a1_T1024_static_eager(ctx, deadline):
    """The static sampler without CUDA graphs: what the graphs save."""
    return _sample(ctx, deadline, 1.0, ctx.shape["T_big"], 0, ctx.shape["N"], method="static", cuda_graphs=False)


def sec_sample_a1_T1024_sdpa(ctx, deadline):
    return _sample(ctx, deadline, 1.0, ctx.shape["T_big"], 0, ctx.shape["N"], backend="sdpa")


def sec_train_flex(ctx: Ctx, deadline: float) -> dict:
    """The same steps with every mask as a flex BlockMask: the attention backend side by side."""
    if ctx.device.type != "cuda":
        return dict(skipped="flex_attention has no backward on CPU")
    return sec_train(ctx, deadline, backend="flex")


def sec_train(ctx: Ctx, deadline: float, backend: str = "auto") -> dict:
    from train_step import ratio_rows, run_train_variants

    dev = ctx.device
    B, L = ctx.shape["train_B"], ctx.shape["train_L"]
    model = ctx.model32
    gen = torch.Generator().manual_seed(ctx.args.seed)
    x = torch.randint(0, model.config.vocab_size - 1, (B, L), generator=gen).to(dev)
    valid = torch.ones(B, L, dtype=torch.bool, device=dev)
    autocast = ctx.args.sample_dtype if dev.type == "cuda" and ctx.args.sample_dtype != torch.float32 else None
    first_error = None
    try:
        res = run_train_variants(model, x, valid, ["hybrid", "mdm"], dev, autocast, backend, ctx.shape["train_repeats"], 1,
                                 ctx.args.seed, budget_s=max(1.0, deadline - time.perf_counter() - 5), profile=True)
        for v, r in res.items():
            pr = r.get("profile", {})
            if "top" in pr:
                log(f"  profile {v}: wall {pr['wall_ms']:.1f} ms, device busy {pr['device_busy_ms'] or 0:.1f} ms, {pr['n_ops']} ops; top:")
                for row in pr["top"][:22]:
                    log(f"    {row['self_ms']:8.2f} ms  x{row['calls']:<5d} {row['name'][:90]}")
    except Exception as e:
        if dev.type != "cuda":
            raise
        # keep the numbers: record flex's failure and measure the SDPA path instead
        first_error = f"{type(e).__name__}: {e}"[:2000]
        log(f"  backend auto (flex) failed: {first_error[:300]}\n  retrying with backend sdpa")
        log(traceback.format_exc()[-1500:])
        torch.cuda.empty_cache()
        backend = "sdpa"
        res = run_train_variants(model, x, valid, ["hybrid", "mdm"], dev, autocast, backend, ctx.shape["train_repeats"], 1,
                                 ctx.args.seed, budget_s=max(1.0, deadline - time.perf_counter() - 5))
    _, ratios = ratio_rows(res, L, B)
    return dict(batch=B, seq_len=L, autocast=str(autocast) if autocast else None, backend=backend, fallback_from_error=first_error,
                variants=res, ratios_vs_mdm=ratios)


def sec_exact(ctx: Ctx, deadline: float) -> dict:
    from likelihood import make_rollout, measure

    dev, sh = ctx.device, ctx.shape
    model = ctx.model16
    r = make_rollout(model, sh["exact_B"], sh["exact_P"], sh["exact_N"], sh["T_big"], 1.0, ctx.args.seed, dev)
    res = measure(model, r, ["plain", "exact"], dev, "auto", sh["exact_repeats"], 1, False, memory=True)
    return dict(batch=sh["exact_B"], P=sh["exact_P"], N=sh["exact_N"], K=len(r.step_sizes), results=res,
                exact_over_plain=res["exact"]["time_ratio"], token_ratio=res["exact"]["token_ratio"])


def sec_breakdown(ctx: Ctx, deadline: float) -> dict:
    """Where a KV-cached step's time goes (α0 = 1, T = T_big, first steps): esorl's mask
    building (``build_mask`` as the sampler calls it), the model forward (cache append and
    attention included), token picking (log-softmax + inverse-CDF draw), and the rest (the
    sampler's Python: layouts, descriptors, scatter). Each part is timed with the device
    synchronised around it, so the parts add up to the step."""
    import esorl.sampling as smp
    from sampling import make_inputs

    dev, B, N = ctx.device, ctx.shape["B"], ctx.shape["N"]
    model = ctx.model16
    pid, pm, traj, u = make_inputs(model, B, 0, N, 1.0, ctx.shape["T_big"], ctx.args.seed, dev)
    parts = {"build_mask": [], "pick": []}
    orig_mask, orig_pick = smp.build_mask, smp._pick

    def timed(name, fn):
        def wrapper(*a, **k):
            sync(dev)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(dev)
            parts[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    class FwdProbe(StepProbe):
        def forward(self, input_ids, *a, **k):
            sync(dev)
            t0 = time.perf_counter()
            out = super().forward(input_ids, *a, **k)
            self.fwd.append(time.perf_counter() - t0)
            return out

    n_steps = ctx.shape["warm_steps"] + 24
    smp.build_mask, smp._pick = timed("build_mask", orig_mask), timed("pick", orig_pick)
    try:
        for phase in ("warm-up", "timed"):
            probe = FwdProbe(model, dev, max_steps=ctx.shape["warm_steps"] if phase == "warm-up" else n_steps, deadline=deadline)
            probe.fwd = []
            for v in parts.values():
                v.clear()
            probe.start()
            t0 = time.perf_counter()
            try:
                smp.generate(probe, pid, pm, N, traj, uniforms=u, method="cache")
            except StopSampling:
                pass
            wall = time.perf_counter() - t0
    finally:
        smp.build_mask, smp._pick = orig_mask, orig_pick
    m = len(probe.step_times)
    warm = ctx.shape["warm_steps"]

    def summary(lo, hi):
        hi = min(hi, m)
        n = max(1, hi - lo)
        ms = lambda xs: 1e3 * sum(xs[lo:hi]) / n  # noqa: E731
        d = dict(steps=f"{lo + 1}-{hi}", n=hi - lo, ms_per_step=ms(probe.step_times), build_mask_ms=ms(parts["build_mask"]),
                 model_forward_ms=ms(probe.fwd), pick_ms=ms(parts["pick"]))
        d["other_python_ms"] = d["ms_per_step"] - d["build_mask_ms"] - d["model_forward_ms"] - d["pick_ms"]
        return d

    # steps whose shapes the warm-up compiled (dynamo keeps up to 8) vs later, new shapes
    out = dict(steps=m, all=summary(0, m), compiled_shapes=summary(0, min(8, warm)), new_shapes=summary(warm, m),
               window_tokens=probe.tokens, step_ms=[round(1e3 * t, 3) for t in probe.step_times],
               forward_ms=[round(1e3 * t, 3) for t in probe.fwd[:m]], mask_ms=[round(1e3 * t, 3) for t in parts["build_mask"][:m]])
    for k in ("compiled_shapes", "new_shapes"):
        d = out[k]
        log(f"  {k} (steps {d['steps']}): " + ", ".join(f"{x} {d[x]:.2f}" for x in d if x.endswith("_ms")))
    out.update({k: v for k, v in out["all"].items() if k.endswith("_ms")})
    return out


def _sample_nocudnn(ctx, deadline, alpha0, T, P, N):
    """The SDPA backend with cuDNN attention disabled (flash cannot take a mask, so SDPA uses
    the memory-efficient or math kernel): tells whether per-shape cuDNN set-up is the cost."""
    if ctx.device.type != "cuda":
        return _sample(ctx, deadline, alpha0, T, P, N, backend="sdpa")
    prev = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        r = _sample(ctx, deadline, alpha0, T, P, N, backend="sdpa")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(prev)
    r["cudnn_sdp"] = False
    return r


def sec_sample_a1_T1024_sdpa_nocudnn(ctx, deadline):
    return _sample_nocudnn(ctx, deadline, 1.0, ctx.shape["T_big"], 0, ctx.shape["N"])


def sec_sample_a0125_T1024_sdpa_nocudnn(ctx, deadline):
    return _sample_nocudnn(ctx, deadline, 0.125, ctx.shape["T_big"], 0, ctx.shape["N"])


def sec_sample_ar_sdpa_nocudnn(ctx, deadline):
    return _sample_nocudnn(ctx, deadline, 0.0, 1, 1, ctx.shape["N"] - 1)


def sec_sample_a1_T128_sdpa_nocudnn(ctx, deadline):
    return _sample_nocudnn(ctx, deadline, 1.0, ctx.shape["T_small"], 0, ctx.shape["N"])


def sec_attn_micro(ctx: Ctx, deadline: float) -> dict:
    """One attention call of a decoding step (B heads of the model, Lq query slots against Lk
    keys) with each backend, for a shape seen for the first time and then again: SDPA with a
    boolean mask (default kernels; cuDNN off), flex eager, flex compiled (dynamic=False, as
    esorl), and ``create_block_mask`` eager / compiled. First-call times include any per-shape
    set-up (compilation, cuDNN plans)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = ctx.device
    cfg = ctx.model16.config
    B, H, D = ctx.shape["B"], cfg.n_heads, cfg.head_dim
    dt = ctx.args.sample_dtype
    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = []

    def clock(fn, n=10):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        first = time.perf_counter() - t0
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return 1e3 * first, 1e3 * ts[len(ts) // 2]

    shapes = [(2, 257), (3, 700), (9, 1013)] if ctx.args.size == "small" else [(2, 17), (3, 40)]
    for Lq, Lk in shapes:
        if time.perf_counter() > deadline:
            break
        q = torch.randn(B, H, Lq, D, generator=gen).to(dev, dt)
        k = torch.randn(B, H, Lk, D, generator=gen).to(dev, dt)
        v = torch.randn(B, H, Lk, D, generator=gen).to(dev, dt)
        allow = torch.rand(B, 1, Lq, Lk, generator=gen).to(dev) < 0.7
        allow[..., 0] = True
        allow_c = allow[:, 0].contiguous()

        def mask_mod(b, h, qi, kj):
            return allow_c[b, qi, kj]

        r = dict(Lq=Lq, Lk=Lk, B=B, H=H, D=D)
        r["sdpa_first_ms"], r["sdpa_ms"] = clock(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allow))
        if dev.type == "cuda":
            prev = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
            try:
                q2 = q.clone()  # a fresh tensor, same shape: no cached plan is involved either way
                r["sdpa_nocudnn_first_ms"], r["sdpa_nocudnn_ms"] = clock(lambda: F.scaled_dot_product_attention(q2, k, v, attn_mask=allow))
            finally:
                torch.backends.cuda.enable_cudnn_sdp(prev)
        r["block_mask_eager_first_ms"], r["block_mask_eager_ms"] = clock(lambda: create_block_mask(mask_mod, B, None, Lq, Lk, device=dev), 3)
        bm = create_block_mask(mask_mod, B, None, Lq, Lk, device=dev)
        r["flex_eager_first_ms"], r["flex_eager_ms"] = clock(lambda: flex_attention(q, k, v, block_mask=bm), 3)
        if dev.type == "cuda":
            cbm = torch.compile(create_block_mask)
            r["block_mask_compiled_first_ms"], r["block_mask_compiled_ms"] = clock(lambda: cbm(mask_mod, B, None, Lq, Lk, device=dev), 3)
            r["flex_compiled_first_ms"], r["flex_compiled_ms"] = clock(lambda: compiled(q, k, v, block_mask=bm), 5)
        rows.append(r)
        log("  " + ", ".join(f"{a}={b:.2f}" if isinstance(b, float) else f"{a}={b}" for a, b in r.items()))
    return dict(calls=rows)


SECTION_FNS = {name: globals()[f"sec_{name}"] for name in SECTIONS}


# ----------------------------------------------------------------------------- report


def _train_rows(rows, t, t_name, vs_ref, met, status_row):
    """Rows of a training section (``train``: the default backend; ``train_flex``: flex)."""
    if not t:
        return
    if t["status"] != "ok":
        rows.append(status_row(t_name, "training steps", t["status"] + ": " + t.get("error", "")[:80]))
        return
    r = t["result"]
    if "skipped" in r:
        rows.append(status_row(t_name, "training steps", "skipped: " + r["skipped"]))
        return
    fb = f", {r['backend']} (after flex failed)" if r.get("fallback_from_error") else ("" if r["backend"] == "auto" else f", {r['backend']}")
    sfx = "" if t_name == "train" else "_" + t_name.split("_", 1)[1]
    for v, key in (("hybrid", "train_hybrid"), ("mdm", "train_mdm")):
        if v in r["variants"]:
            ref = REFERENCE[key]
            med = r["variants"][v]["median_s"]
            tgt = ref.get("target_s")
            what = f"train step {'hybrid a0=0.125 k=0.5' if v == 'hybrid' else 'MDM-only'}, {r['batch']}x{r['seq_len']}{fb}"
            rows.append([key + sfx, what, fmt_time(med), "-", "-", fmt_time(ref["ref_s"]), vs_ref(ref["ref_s"], med),
                         f"<= {tgt * 1e3:.0f} ms" if tgt else "-", met(med <= tgt) if tgt else "-",
                         f"first step {fmt_time(r['variants'][v]['warmup_s'][0])}, peak {fmt_bytes(r['variants'][v].get('peak_bytes'))}"])
    rt = r["ratios_vs_mdm"].get("hybrid")
    if rt and rt["measured"] is not None:
        rows.append(["train_ratio" + sfx, f"hybrid / MDM-only step time{fb}", fmt_x(rt["measured"]), "-", "-", "1.97x", "-",
                     f"<= 1.1 x {rt['token_layout']:.2f}", "yes" if rt["measured_over_token_layout"] <= 1.1 else "NO",
                     f"token ratio {rt['token_layout']:.2f}x (layouts) / 1.50x (spec) / 1.44x (masked copies only)"])


def table_rows(results: dict, comparable: bool) -> list[list]:
    """One row per measurement; reference columns only where the run is comparable (the
    small model on a GPU)."""
    rows = []

    def status_row(name, what, note):
        return [name, what, "-", "-", "-", "-", "-", "-", "-", note]

    def vs_ref(ref_s, value_s):
        return fmt_x(ref_s / value_s, 1) if comparable else "n/a"

    def met(ok):
        return ("yes" if ok else "NO") if comparable else "n/a"

    c = results.get("correctness")
    if c:
        if c["status"] == "ok":
            r = c["result"]
            worst = max((x.get("max_abs_exact_minus_replay", 0) for x in r["checks"]), default=0)
            mism = sum(x.get("token_mismatches", 0) + x.get("static_vs_cache_token_mismatches", 0)
                       + x.get("static_graph_vs_eager_token_mismatches", 0) for x in r["checks"])
            verdict = ("PASS" if r["passed"] else "FAIL") + ("" if r.get("complete", True) else f" ({r['checks_run']}/{r['checks_total']} run)")
            rows.append(["correctness", f"static(+graphs) == cache == no-cache tokens, exact ~ replay ({r['backend_auto']}, fp32)", verdict,
                         "-", "-", "-", "-", "<= 1e-4", "yes" if r["passed"] else "NO",
                         f"{mism} token mismatches, max |exact - replay| {worst:.1e}"
                         + ("" if r.get("complete", True) else "; other checks skipped: time")])
        else:
            rows.append(status_row("correctness", "GPU-path correctness", c["status"] + ": " + c.get("error", "")[:80]))
    for name in ("sample_a1_T1024", "sample_a1_T128", "sample_a0125_T1024", "sample_ar", "sample_a1_T1024_cache",
                 "sample_a1_T1024_static_eager", "sample_ar_cache", "mdlm_T1024", "sample_a1_T1024_sdpa",
                 "sample_a1_T1024_sdpa_nocudnn", "sample_a1_T128_sdpa_nocudnn", "sample_a0125_T1024_sdpa_nocudnn", "sample_ar_sdpa_nocudnn"):
        s = results.get(name)
        if not s:
            continue
        ref = REFERENCE[name]
        if s["status"] != "ok":
            if s["status"] == "error":
                rows.append(status_row(name, ref["what"], "error: " + s.get("error", "")[:80]))
            continue
        r = s["result"]
        kind = {"mdlm": "MDLM no cache", "cache": "KV-cached (mask per window)", "replay": "no cache (replay)"}.get(
            r["method"], "static KV-cached" + (" + CUDA graphs" if r.get("cuda_graphs") else ", eager"))
        what = (f"{kind} a0={r['alpha0']:g} T={r['T']}, B={r['B']} P={r['P']} N={r['N']}"
                + ("" if r["backend"] == "auto" else f", {r['backend']}") + (", no cuDNN" if r.get("cudnn_sdp") is False else ""))
        tgt = ref.get("target_s")
        rows.append([name, what, fmt_time(r["total_s"]), f"{r['ms_per_step']:.2f} ms", r["K"], fmt_time(ref["ref_s"]),
                     vs_ref(ref["ref_s"], r["total_s"]), f"<= {tgt} s" if tgt else "-", met(r["total_s"] <= tgt) if tgt else "-",
                     ((f"measured (best of {len(r['calls_s']) - 1} calls after the first, {r['first_call_s']:.2f} s)" if r.get("calls_s") else "measured")
                      if r["how"].startswith("measured") else f"EXTRAPOLATED from {r['steps_measured']}/{r['K']} steps")
                     + f", peak {fmt_bytes(r['peak_bytes'])}"])
    for t_name in ("train", "train_flex"):
        _train_rows(rows, results.get(t_name), t_name, vs_ref, met, status_row)
    e = results.get("exact")
    if e:
        if e["status"] != "ok":
            rows.append(status_row("exact", "exact vs plain forward", e["status"] + ": " + e.get("error", "")[:80]))
        else:
            r = e["result"]
            rows.append(["exact", f"exact / plain fwd, {r['batch']} rollouts P={r['P']} N={r['N']}", fmt_x(r["exact_over_plain"]),
                         "-", r["K"], "-", "-", "<= 2.3x", "yes" if r["exact_over_plain"] <= 2.3 else "NO",
                         f"exact {fmt_time(r['results']['exact']['median_s'])}, plain {fmt_time(r['results']['plain']['median_s'])}, "
                         f"token ratio {r['token_ratio']:.2f}x"])
    b = results.get("breakdown")
    if b:
        if b["status"] != "ok":
            rows.append(status_row("breakdown", "KV-cached step breakdown", b["status"] + ": " + b.get("error", "")[:80]))
        else:
            r = b["result"]
            for k, label in (("compiled_shapes", "shapes compiled in warm-up"), ("new_shapes", "new shapes")):
                d = r.get(k)
                if d and d["n"] > 0:
                    rows.append([f"breakdown", f"KV-cached step a0=1, steps {d['steps']} ({label})", f"{d['ms_per_step']:.2f} ms", "-", d["n"],
                                 "-", "-", "-", "-", f"mask {d['build_mask_ms']:.2f} + forward {d['model_forward_ms']:.2f} + pick {d['pick_ms']:.2f} "
                                 f"+ python {d['other_python_ms']:.2f} ms"])
    a = results.get("attn_micro")
    if a and a["status"] == "ok":
        for r in a["result"]["calls"]:
            keys = [k[:-3] for k in r if k.endswith("_ms") and not k.endswith("_first_ms")]
            rows.append(["attn_micro", f"one attention call, B={r['B']} H={r['H']} Lq={r['Lq']} Lk={r['Lk']}", "-", "-", "-", "-", "-", "-", "-",
                         "; ".join(f"{k} {r[k + '_first_ms']:.1f}/{r[k + '_ms']:.2f}" for k in keys) + " ms (first/again)"])
    elif a:
        rows.append(status_row("attn_micro", "attention calls", a["status"] + ": " + a.get("error", "")[:80]))
    for name, s in results.items():
        if s["status"] == "skipped":
            rows.append(status_row(name, "-", "skipped: " + s.get("reason", "")))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda (default when available) | cpu")
    p.add_argument("--size", default=None, choices=list(SHAPES), help="small (issue 6; default on cuda) | tiny (default on cpu)")
    p.add_argument("--dtype", default="auto", help="sampling/scoring weights and training autocast dtype: auto (bf16 on cuda, float32 on cpu)")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma list, in order, from: {','.join(SECTIONS)}")
    p.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS", help="override a section's time cap")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget from process start; sections that do not fit are "
                   "skipped and samplers are stopped and extrapolated (default 225 on cuda, 50 on cpu)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu-<date>-<card>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see common.py)")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = resolve_device(args.device)
    args.size = args.size or ("small" if device.type == "cuda" else "tiny")
    from common import resolve_dtype

    args.sample_dtype = resolve_dtype(args.dtype, device)
    budget = args.budget_s if args.budget_s is not None else (225.0 if device.type == "cuda" else 50.0)
    t_end = _T_START + budget
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    for n in names:
        if n not in SECTIONS:
            raise SystemExit(f"unknown section {n!r}; choose from {', '.join(SECTIONS)}")
    date = _dt.date.today().isoformat()
    card = card_slug(device)
    out = args.out or str(RESULTS / f"gpu-{date}-{card}{'' if args.size == 'small' else '-' + args.size}.json")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 correctness checks in true float32
        torch.backends.cudnn.allow_tf32 = False
    dname = device_name(device)
    log(f"gpu.py: {dname}, size {args.size}, sampling dtype {args.sample_dtype}, budget {budget:.0f} s, "
        f"torch {torch.__version__}, sections {','.join(names)} (start-up {time.perf_counter() - _T_START:.1f} s)")
    ctx = Ctx(args, device)
    results: dict[str, dict] = {}
    scale = 1.0 if args.size == "small" else 0.5

    def save():
        payload = dict(benchmark="gpu", size=args.size, shapes=SHAPES[args.size], sample_dtype=str(args.sample_dtype),
                       budget_s=budget, elapsed_s=time.perf_counter() - _T_START, card=dname, sections=results,
                       reference=dict(card=REFERENCE_CARD, numbers=REFERENCE, transformers_bar=HF_BAR))
        if table_text is not None:
            payload["table"] = table_text
        try:
            write_json(out, payload, device)
        except Exception as e:  # never lose the run to a JSON problem
            log(f"  could not write {out}: {e!r}")

    table_text = None
    caps = {}
    for c in args.cap:
        k, _, v = c.partition("=")
        if k not in SECTIONS:
            raise SystemExit(f"--cap: unknown section {k!r}")
        caps[k] = float(v)
    group = None
    for name in names:
        cap, least, sec_group = SECTIONS[name]
        if name in caps:
            cap = caps[name] / scale
        now = time.perf_counter()
        left = t_end - now
        if left < least * scale:
            results[name] = dict(status="skipped", reason=f"time budget ({left:.0f} s left, needs {least * scale:.0f} s)")
            log(f"[{name}] skipped: {results[name]['reason']}")
            continue
        deadline = now + min(cap * scale, left - 2)
        log(f"[{name}] start ({left:.0f} s of budget left, section cap {deadline - now:.0f} s)")
        if sec_group != group:
            try:
                import torch._dynamo as dynamo

                dynamo.reset()
            except Exception:
                pass
            group = sec_group
        try:
            res = SECTION_FNS[name](ctx, deadline)
            results[name] = dict(status="ok", result=res)
        except Exception as e:
            tb = traceback.format_exc()
            results[name] = dict(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=tb[-4000:])
            log(f"[{name}] ERROR {type(e).__name__}: {str(e)[:500]}")
            log(tb[-2000:])
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[name]["elapsed_s"] = time.perf_counter() - now
        log(f"[{name}] {results[name]['status']} in {results[name]['elapsed_s']:.1f} s")
        save()
    rows = table_rows(results, comparable=device.type == "cuda" and args.size == "small")
    table_text = print_table(
        f"esorl on {dname} (size {args.size}) vs the reference implementation on {REFERENCE_CARD}",
        ["section", "what", f"esorl", "per step", "steps", "reference", "ref/esorl", "target", "met?", "note"], rows,
        [HF_BAR, "EXTRAPOLATED rows: the sampler was stopped at its time share; total = measured steps + the rest at the median step time",
         "reference / ref/esorl / met?: the issue 6 numbers, comparable only for the small model on a GPU (n/a otherwise)",
         f"total wall time {time.perf_counter() - _T_START:.0f} s (budget {budget:.0f} s)"], left=(0, 1, -1))
    save()
    return results


if __name__ == "__main__":
    main()
