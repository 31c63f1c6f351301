"""Gradient checkpointing of the Eso-LM blocks: peak memory and step time of one
forward + backward, with and without it (issue 11).

Each configuration runs in its own process (a process's peak resident set only ever grows,
so configurations must not share one): ``plain``, ``ckpt`` (``gradient_checkpointing_enable()``
as TRL and ``transformers.Trainer`` call it: non-reentrant) and ``ckpt_reentrant``. In each
process: build the model (random weights, every parameter non-zero) and the batch, then

1. peak memory of the first forward + backward: on CPU the process's peak RSS
   (``resource.getrusage(...).ru_maxrss``) and its growth above the resident set just before
   the step; on CUDA ``torch.cuda.max_memory_allocated`` above the memory allocated before;
2. step time: median of ``--repeats`` forward + backward after one warm-up;
3. the bytes autograd keeps for the backward (``saved_tensors_hooks`` over one forward:
   exact, allocator-independent; with checkpointing, what the checkpoints keep).

Workloads: ``exact`` (default; GRPO's training forward): ``likelihood.exact`` of ``--batch``
rollouts with ``--prompt`` prompt and ``--new`` completion tokens, one pass over
``P + 2N`` slots under the dense Eso-LM mask; ``hybrid``: the pretraining loss
(``objective.hybrid_loss``, one padded forward) of ``--batch`` sequences of ``--seq-len``.

    python benchmarks/grad_checkpointing.py                     # 8 layers x 256, exact 4 x (32 + 2·224), ~1 min on 2 cores
    python benchmarks/grad_checkpointing.py --workload hybrid --seq-len 256
    python benchmarks/grad_checkpointing.py --device cuda --layers 12 --hidden 768 --heads 12 --vocab 50258
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    RESULTS, dtype_name, fmt_bytes, fmt_time, fmt_x, log, make_model, print_table, resolve_device, resolve_dtype,
    setup_threads, sync, write_json,
)

import torch  # noqa: E402

CONFIGS = {"plain": None, "ckpt": {"use_reentrant": False}, "ckpt_reentrant": {"use_reentrant": True}}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _loss_fn(model, a, device):
    """``loss(model) -> scalar`` for the workload, inputs built once (seeded)."""
    gen = torch.Generator().manual_seed(a.seed)
    V = model.config.vocab_size
    if a.workload == "exact":
        from esorl.likelihood import exact
        from esorl.rollout import Rollout
        from esorl.schedule import ScheduleConfig

        B, P, N = a.batch, a.prompt, a.new
        traj = ScheduleConfig(alpha0=1.0, num_steps=max(1, N // 4)).sample(B, N, gen)
        ro = Rollout.from_tokens(torch.randint(5, V - 1, (B, P), generator=gen), torch.ones(B, P, dtype=torch.bool),
                                 torch.randint(5, V - 1, (B, N), generator=gen), traj).to(device)

        def loss(m):
            lp, valid = exact(m, ro, backend="sdpa")
            return -(lp * valid).sum() / valid.sum()

        return loss, B * (P + 2 * N)
    from esorl.objective import ObjectiveConfig, hybrid_loss

    B, L = a.batch, a.seq_len
    x = torch.randint(5, V - 1, (B, L), generator=gen).to(device)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    cfg = ObjectiveConfig(alpha0=0.125, batch_split=0.5)
    return (lambda m: hybrid_loss(m, x, valid, cfg, a.seed, 0, torch.arange(B), B, single_forward=True).loss), None


def child(a) -> dict:
    """One configuration, in this process: memory first (a fresh peak), then time, then the
    bytes autograd saves."""
    setup_threads(a.threads)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    size = dict(vocab_size=a.vocab, hidden_size=a.hidden, n_layers=a.layers, n_heads=a.heads, cond_dim=64, max_seq_len=1024)
    model = make_model(size, device, dtype, seed=a.seed, dropout=a.dropout).train()
    kw = CONFIGS[a.config]
    if kw is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    loss_fn, tokens = _loss_fn(model, a, device)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        return float(loss)

    # 1. memory of the first step
    out = {"config": a.config, "checkpoint_kwargs": kw, "tokens_per_forward": tokens}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out["loss"] = step()
        sync(device)
        out.update(peak_kind="cuda max_memory_allocated", step_peak_bytes=torch.cuda.max_memory_allocated(device) - base,
                   process_peak_bytes=torch.cuda.max_memory_allocated(device))
    else:
        rss0, max0 = _rss_now(), _maxrss()
        out["loss"] = step()
        max1 = _maxrss()
        # ru_maxrss is a high-water mark: growth above the resident set before the step is
        # only readable when the step set a new mark (it does: activations dominate)
        out.update(peak_kind="cpu ru_maxrss", process_peak_bytes=max1, rss_before_bytes=rss0,
                   step_peak_bytes=max1 - rss0 if max1 > max0 else None)
    # 2. time
    step()  # warm-up
    times = []
    for _ in range(a.repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    out.update(step_s=sorted(times)[len(times) // 2], times_s=times)
    # 3. bytes kept for the backward
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model)
    out["saved_bytes"] = saved[0]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, float32 on cpu) | float32 | bfloat16")
    p.add_argument("--out", default=str(RESULTS / "grad_checkpointing.json"))
    p.add_argument("--workload", default="exact", choices=["exact", "hybrid"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32, help="exact: prompt tokens P")
    p.add_argument("--new", type=int, default=224, help="exact: completion tokens N (P + 2N slots per row)")
    p.add_argument("--seq-len", type=int, default=256, help="hybrid: sequence length")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see README)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.config = a.child
        print("RESULT " + json.dumps(child(a)), flush=True)
        return 0

    device = resolve_device(a.device)
    configs = [c for c in a.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown --configs {sorted(unknown)}; choose from {','.join(CONFIGS)}")
    t0 = time.perf_counter()
    rows = {}
    args = list(argv if argv is not None else sys.argv[1:])
    for cfg in configs:
        log(f"[{cfg}] own process ...")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args, "--child", cfg], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{cfg} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        rows[cfg] = json.loads(line[len("RESULT "):])
        r = rows[cfg]
        log(f"[{cfg}] step {fmt_time(r['step_s'])}, step peak {fmt_bytes(r['step_peak_bytes'])}, saved {fmt_bytes(r['saved_bytes'])}")

    base = rows.get("plain")

    def ratio(r, key):
        return r[key] / base[key] if base and base.get(key) and r.get(key) is not None else None

    shape = (f"exact, {a.batch} x ({a.prompt} + 2·{a.new}) = {a.batch} x {a.prompt + 2 * a.new} slots" if a.workload == "exact"
             else f"hybrid loss, {a.batch} x {a.seq_len}, one padded forward")
    dt = dtype_name(resolve_dtype(a.dtype, device))
    columns = ["config", "step peak", "vs plain", "process peak", "saved for backward", "vs plain", "step time", "vs plain"]
    table_rows = [[c, fmt_bytes(r["step_peak_bytes"]), fmt_x(ratio(r, "step_peak_bytes")), fmt_bytes(r["process_peak_bytes"]),
                   fmt_bytes(r["saved_bytes"]), fmt_x(ratio(r, "saved_bytes")), fmt_time(r["step_s"]), fmt_x(ratio(r, "step_s"))]
                  for c, r in rows.items()]
    kind = next(iter(rows.values()))["peak_kind"]
    notes = [f"Eso-LM {a.layers} layers x {a.hidden} hidden, {a.heads} heads, vocab {a.vocab}, {dt}, dropout {a.dropout}; {shape}",
             f"step peak: {kind} above the memory before the step; step time: median of {a.repeats} after a warm-up; "
             "each config in its own process"]
    table = print_table(f"Gradient checkpointing, one forward + backward ({device.type})", columns, table_rows, notes)
    md = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                   + ["| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in table_rows])
    print(md, flush=True)
    write_json(a.out, {
        "benchmark": "grad_checkpointing", "workload": a.workload, "shape": shape, "dtype": dt,
        "model": dict(n_layers=a.layers, hidden_size=a.hidden, n_heads=a.heads, vocab_size=a.vocab, dropout=a.dropout),
        "args": vars(a), "configs": rows, "elapsed_s": time.perf_counter() - t0, "table": table, "markdown": md,
    }, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
