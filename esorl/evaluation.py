"""``esorl eval``: a model on a verifiable task over a grid of sampling schedules and
generation lengths — accuracy, pass@k, forward passes (NFEs), speed and memory: the
speed–quality frontier Eso-LMs exist for.

For every grid point ``(α0, T, N)`` each test prompt gets ``--num-generations`` completions from the
KV-cached sampler (seeded: the same grid point gives the same completions); a completion is
correct when the task's checker accepts it (:mod:`esorl.tasks`). Reported per point:
accuracy (= pass@1, the mean over all completions), unbiased pass@k for ``k = 1..num_generations``
(Chen et al. 2021), NFEs (the sampler's forward passes per completion batch: its number of
steps), generated tokens per second and wall-clock, and peak memory (CUDA: the point's peak
allocation; CPU: the process's resident high-water mark so far). Written as ``eval.json``,
``eval.md`` and ``accuracy_vs_nfe.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {s!r}")
    return out


def _peak_memory_mb(device) -> float:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_grid(policy, task: str, prompts: list[str], columns: dict, samples: int, grid: list[tuple[float, int, int]], seed: int = 0,
                  batch_size: int = 64, rendering: str = "compact", progress: bool = True) -> list[dict]:
    """Score ``samples`` completions per prompt at every ``(alpha0, steps, max_completion_length)``.

    ``columns``: the task dataset's columns for the reward (``entry``/``answer``), aligned with
    ``prompts``. Returns one record per grid point (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from .sampling import SamplingConfig
    from .schedule import ScheduleConfig
    from .tasks import pass_at_k
    from .tasks.registry import TaskCorrectness

    correct_fn = TaskCorrectness(task, rendering)
    out = []
    rep_prompts = [p for p in prompts for _ in range(samples)]
    rep_cols = {k: [v for v in vals for _ in range(samples)] for k, vals in columns.items()}
    bar = tqdm(total=len(grid) * len(rep_prompts), desc=f"eval {task}", disable=not progress, dynamic_ncols=True)
    dev = policy.device
    for gi, (alpha0, steps, n_new) in enumerate(grid):
        s = SamplingConfig(n_new, ScheduleConfig(alpha0=alpha0, num_steps=steps), policy.sampling.temperature, policy.sampling.top_k,
                           policy.sampling.top_p)
        s.validate()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        correct, nfes, t0 = [], [], time.time()
        for b in range(0, len(rep_prompts), batch_size):
            chunk = rep_prompts[b : b + batch_size]
            ro = policy.generate(chunk, seed, gi, torch.arange(b, b + len(chunk)), sampling=s)
            texts = policy.texts(ro)
            correct += correct_fn(chunk, texts, **{k: v[b : b + len(chunk)] for k, v in rep_cols.items()})
            nfes.append(len(ro.step_sizes))
            bar.update(len(chunk))
        wall = time.time() - t0
        per_prompt = [sum(correct[i * samples : (i + 1) * samples]) for i in range(len(prompts))]
        passk = {str(k): sum(pass_at_k(samples, int(c), k) for c in per_prompt) / len(prompts) for k in range(1, samples + 1)}
        out.append({"alpha0": alpha0, "steps": steps, "max_completion_length": n_new, "accuracy": sum(correct) / len(correct),
                    "pass_at_k": passk, "nfe": sum(nfes) / len(nfes), "seconds": wall,
                    "tokens_per_s": len(rep_prompts) * n_new / max(wall, 1e-9), "peak_memory_mb": _peak_memory_mb(dev),
                    "prompts": len(prompts), "samples": samples})
    bar.close()
    return out


def write_outputs(records: list[dict], out: Path, meta: dict) -> dict:
    """``eval.json``, ``eval.md`` (a table) and ``accuracy_vs_nfe.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({**meta, "grid": records}, indent=1))
    ks = list(records[0]["pass_at_k"]) if records else []
    head = "| α0 | T | N | NFEs | accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " | tokens/s | s | peak MB |"
    lines = [f"# esorl eval: {meta['task']} ({meta['rendering']}, {meta['split']}) — {meta['model']}", "",
             f"{records[0]['prompts'] if records else 0} prompts × {meta['samples']} samples per grid point, seed {meta['seed']}; "
             "NFEs = forward passes of the KV-cached sampler per batch (its steps).", "", head,
             "|" + "---|" * (8 + len(ks))]
    for r in records:
        lines.append(f"| {r['alpha0']} | {r['steps']} | {r['max_completion_length']} | {r['nfe']:.1f} | {r['accuracy']:.3f} | "
                     + " | ".join(f"{r['pass_at_k'][k]:.3f}" for k in ks) + f" | {r['tokens_per_s']:.0f} | {r['seconds']:.1f} | {r['peak_memory_mb']:.0f} |")
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r["max_completion_length"] for r in records}):
        pts = sorted(((r["nfe"], r["accuracy"], r) for r in records if r["max_completion_length"] == n), key=lambda x: (x[0], x[1]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"N = {n}")
        for x, y, r in pts:
            ax.annotate(f"α0={r['alpha0']}, T={r['steps']}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("forward passes per completion batch (NFEs)"), ax.set_ylabel("accuracy (pass@1)"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title(f"{meta['task']}: accuracy vs sampling cost")
    save_figure(fig, out / "accuracy_vs_nfe.png")
    return {"json": str(out / "eval.json"), "markdown": str(out / "eval.md"), "plot": str(out / "accuracy_vs_nfe.png")}


def main(argv=None):
    from .configuration_esolm import check_model_dir
    from .tasks import RENDERINGS, TASKS

    p = argparse.ArgumentParser(prog="esorl eval", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained directory of an Eso-LM")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--rendering", default="compact", choices=RENDERINGS, help="prompt rendering (as the model was trained on)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--num-prompts", type=int, default=100, help="test prompts (0 = the whole split)")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (pass@k for k = 1..num_generations)")
    p.add_argument("--sampling-alpha0", type=_floats, default=[1.0], help="comma list of sampling α0 values")
    p.add_argument("--diffusion-steps", type=_ints, default=[8], help="comma list of diffusion step counts T")
    p.add_argument("--max-completion-length", type=_ints, default=[16], help="comma list of generation lengths N")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="task split seed and sampling seed")
    p.add_argument("--source", default="", help="GSM8K: a local directory with test.jsonl (default: the hub's openai/gsm8k)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/eval", help="output directory")
    from .config import RENAMED_SAMPLING_FLAGS, add_renamed_flags

    add_renamed_flags(p, {k: v for k, v in RENAMED_SAMPLING_FLAGS.items() if k != "--num-samples"})
    a = p.parse_args(argv)
    if a.num_generations < 1 or a.num_prompts < 0 or a.batch_size < 1:
        p.error("--num-generations and --batch-size must be >= 1, --num-prompts >= 0")
    if any(not 0.0 <= x <= 1.0 for x in a.sampling_alpha0):
        p.error(f"--sampling-alpha0 values must be in [0, 1], got {a.sampling_alpha0}")
    check_model_dir(a.model)
    import torch

    from . import EsoLMModel
    from .data import load_tokenizer
    from .policy import EsoPolicy
    from .sampling import SamplingConfig
    from .tasks import load_task

    torch.manual_seed(a.seed)
    ds = load_task(a.task, a.split, size=a.num_prompts or 1000, seed=a.seed, rendering=a.rendering, test_size=a.num_prompts or 200, source=a.source)
    if a.num_prompts:
        ds = ds.select(range(min(a.num_prompts, len(ds))))
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EsoLMModel.from_pretrained(a.model).to(device).eval()
    policy = EsoPolicy(model, load_tokenizer(a.model), SamplingConfig(a.max_completion_length[0], temperature=a.temperature))
    grid = [(x, t, n) for n in a.max_completion_length for x in a.sampling_alpha0 for t in a.diffusion_steps]
    recs = evaluate_grid(policy, a.task, list(ds["prompt"]), {"entry": list(ds["entry"]), "answer": list(ds["answer"])}, a.num_generations, grid,
                         a.seed, a.batch_size, a.rendering)
    meta = {"model": a.model, "task": a.task, "rendering": a.rendering, "split": a.split, "samples": a.num_generations, "seed": a.seed,
            "device": device, "torch": torch.__version__}
    paths = write_outputs(recs, Path(a.out), meta)
    print(Path(paths["markdown"]).read_text())
    print(f"[esorl] eval written to {a.out}: eval.json, eval.md, accuracy_vs_nfe.png")
