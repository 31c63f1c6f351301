"""Shared helpers of the esorl benchmarks: devices, models with random weights, timing,
peak memory, tables and JSON with the machine they ran on.

Benchmarks are scripts, not tests: they print a readable table and write JSON
(``benchmarks/results/<name>.json``). Every timing here

* warms up first (module load, compilation and allocator growth stay out of the numbers),
* synchronises the device before reading the clock (CUDA work is asynchronous),
* reports the median of the repeats (and min / max / every repeat in the JSON).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated when the
measurement started; on CPU the peak of the process's resident set size above its value at
the start, sampled every millisecond by a thread, with glibc told to return freed blocks of
64 KiB and more to the system (``tracemalloc`` does not see torch's allocations; a
process-wide ``ru_maxrss`` only moves when an earlier peak is beaten). CPU numbers are
therefore approximate (small allocations and sampling gaps are missed), and ``None`` when
nothing could be read.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere, without PYTHONPATH
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

# ----------------------------------------------------------------------------- model sizes

#: Model shapes. ``small`` is the released Eso-LM (B) OpenWebText model (docs/ESOLM.md §9).
SIZES = {
    "tiny": dict(vocab_size=512, hidden_size=64, n_layers=2, n_heads=2, cond_dim=16, max_seq_len=1024),
    # a CPU "medium": big enough that matrix work outweighs Python overhead, still seconds per step
    "cpu": dict(vocab_size=4096, hidden_size=256, n_layers=4, n_heads=4, cond_dim=64, max_seq_len=1024),
    "small": dict(vocab_size=50258, hidden_size=768, n_layers=12, n_heads=12, cond_dim=128, max_seq_len=1024),
}


def log(*args) -> None:
    """Progress line, flushed at once (long GPU runs must show where they are)."""
    print(*args, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise SystemExit(f"unknown --dtype {name!r}; choose from auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def add_common_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, float32 on cpu) | float32 | bfloat16 | float64")
    p.add_argument("--out", default=str(RESULTS / default_out), help="JSON file to write")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy shared machine 2 threads ran 30x slower than 1, "
                        "OpenMP spin-waiting; 0 = torch's default)")


def setup_threads(n: int) -> None:
    if n and n > 0:
        torch.set_num_threads(n)


def make_model(size: str | dict, device, dtype=torch.float32, seed: int = 0, std: float = 0.02, dropout: float = 0.0,
               max_seq_len: int | None = None):
    """An :class:`EsoLMModel` with random weights, every parameter non-zero.

    The reference init zeroes the adaLN and output projections (each block starts as the
    identity, logits uniform); benchmarks and GPU checks must not run on zeros, so every
    matrix is drawn ``N(0, std²)`` and LayerNorm weights ``1 + N(0, 0.1²)``.
    """
    from esorl import EsoLMConfig, EsoLMModel

    kw = dict(SIZES[size]) if isinstance(size, str) else dict(size)
    if max_seq_len is not None:
        kw["max_seq_len"] = max_seq_len
    kw.setdefault("mask_token_id", kw["vocab_size"] - 1)
    cfg = EsoLMConfig(dropout=dropout, pad_token_id=0, eos_token_id=None, **kw)
    torch.manual_seed(seed)
    model = EsoLMModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.to(device=device, dtype=dtype)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- timing


def sync(device) -> None:
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, device, warmup: int = 1, repeats: int = 3, budget_s: float | None = None) -> dict:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed (device synchronised
    around each run). Returns ``median_s`` (the number to report), ``min_s``, ``max_s``,
    ``times_s``, ``warmup_s`` (the first call's time: compilation shows up there) and the
    last return value under ``result``. ``budget_s``: stop repeating (after at least one timed
    run) once the timed runs have used this much time."""
    warm_times, result = [], None
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        warm_times.append(time.perf_counter() - t0)
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) > budget_s:
            break
    return {
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
        "warmup_s": warm_times, "repeats": len(times), "result": result,
    }


def public(d: dict) -> dict:
    """A timing dict without the (non-JSON) ``result``."""
    return {k: v for k, v in d.items() if k != "result"}


# ----------------------------------------------------------------------------- memory


_MALLOPT_DONE = False


def _cpu_malloc_for_rss() -> None:
    """Make freed tensors leave the resident set: allocations of 64 KiB and more get their own
    mmap (glibc ``M_MMAP_THRESHOLD``; ``M_TRIM_THRESHOLD`` likewise), so RSS follows live
    tensors instead of glibc's free lists. Applied once, at the first CPU memory measurement:
    scripts measure memory after their timings, because mmap'd allocations are slower.
    ``malloc_trim`` before every measurement returns the heap's free pages."""
    global _MALLOPT_DONE
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not _MALLOPT_DONE:
            libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 65536)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)  # hand free heap pages back, so reusing them shows up in RSS
    except (OSError, AttributeError):
        pass
    _MALLOPT_DONE = True


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (above the start) and
    ``m.kind``: ``cuda max_memory_allocated`` or ``cpu sampled RSS``; ``None`` if unreadable."""

    def __init__(self, device, interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "cpu sampled RSS"

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _cpu_malloc_for_rss()
            self._base = _rss_bytes()
            self._max = self._base
            self._stop = threading.Event()
            if self._base is not None:
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            v = _rss_bytes()
            if v is not None and v > self._max:
                self._max = v
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            if self._base is not None:
                self._thread.join()
                v = _rss_bytes()
                self.peak_bytes = max(self._max, v or 0) - self._base
        return False


# ----------------------------------------------------------------------------- machine info


def _git_commit() -> str | None:
    """The checked-out commit, read from ``.git`` files (no git process is run)."""
    try:
        git = REPO / ".git"
        if git.is_file():  # worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        for base in (git, Path(str(git).split("/worktrees/")[0]) if "/worktrees/" in str(git) else git):
            f = base / ref
            if f.is_file():
                return f.read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def machine_info(device) -> dict:
    dev = torch.device(device)
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(dev), "device_name": device_name(dev),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "git_commit": _git_commit(),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(cuda=torch.version.cuda, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count)
    return info


def card_slug(device) -> str:
    """``nvidia-h100-80gb-hbm3`` / ``cpu``: for result file names."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


# ----------------------------------------------------------------------------- output


def fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    if abs(b) >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    if abs(b) >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**10:.0f} KiB"


def fmt_x(r, digits: int = 2) -> str:
    return "-" if r is None or (isinstance(r, float) and math.isnan(r)) else f"{r:.{digits}f}x"


def print_table(title: str, columns: list[str], rows: list[list], notes: list[str] = (), left: tuple[int, ...] = (0,)) -> str:
    """Print (and return) a plain fixed-width table; cells are strings or numbers. Columns
    whose index is in ``left`` are left-aligned (negative indices count from the end)."""
    cells = [[str(c) for c in columns]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lefts = {i % len(columns) for i in left}

    def line(r):
        return "  ".join(c.ljust(w) if i in lefts else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [title, line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    out += [f"  {n}" for n in notes]
    text = "\n".join(out)
    print("\n" + text + "\n", flush=True)
    return text


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (torch.dtype, torch.device, Path)):
        return str(v)
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def write_json(path, payload: dict, device) -> Path:
    """Write ``{"machine": ..., **payload}`` to ``path`` (directories created, atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_info(device), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(path)
    log(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------- sampler probe


class StopSampling(Exception):
    """Raised by :class:`StepProbe` to end a generation early (time or step cap)."""


class StepProbe(torch.nn.Module):
    """Wraps a model for :func:`esorl.sampling.generate`: times every forward (= sampler step,
    measured end to end so the sampler's Python work between forwards is included) and can
    stop the generation after ``max_steps`` steps or past ``deadline`` (``time.perf_counter``).

    ``esorl.modeling_esolm.unwrap`` finds the model through ``.module``, so ``generate`` reads
    the config and dtype of the real model.
    """

    def __init__(self, model, device, max_steps: int | None = None, deadline: float | None = None, min_steps: int = 4):
        super().__init__()
        self.module = model
        self.device = torch.device(device)
        self.max_steps, self.deadline, self.min_steps = max_steps, deadline, min_steps
        self.step_times: list[float] = []
        self.tokens: list[int] = []
        self._last = None

    def start(self):
        sync(self.device)
        self._last = time.perf_counter()
        self.step_times, self.tokens = [], []

    def forward(self, input_ids, *args, **kwargs):
        n = len(self.step_times)
        if self.max_steps is not None and n >= self.max_steps:
            raise StopSampling
        if self.deadline is not None and n >= self.min_steps and time.perf_counter() > self.deadline:
            raise StopSampling
        out = self.module(input_ids, *args, **kwargs)
        sync(self.device)
        t = time.perf_counter()
        self.step_times.append(t - self._last)
        self.tokens.append(int(input_ids.shape[1]))
        self._last = t
        return out


def extrapolate(step_times: list[float], total_steps: int) -> tuple[float, str]:
    """Total time of ``total_steps`` steps from the first ``len(step_times)``: the measured
    time plus the remaining steps at the median measured step time (the first two steps left
    out when there are enough). A trend fitted to a few early steps extrapolates wildly on a
    noisy machine, so none is fitted; a cached sampler's steps grow slightly more expensive as
    its cache fills, so for it the estimate is on the low side. Returns (seconds, how)."""
    m = len(step_times)
    done = sum(step_times)
    if m >= total_steps:
        return done, "measured"
    fit = step_times[2:] if m > 4 else step_times
    med = statistics.median(fit) if fit else 0.0
    return done + med * (total_steps - m), (f"extrapolated from {m}/{total_steps} steps at their median step time "
                                           f"({1e3 * med:.2f} ms)")
