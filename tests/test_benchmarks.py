"""Smoke tests of the benchmark scripts: each runs on CPU at its smallest size as a subprocess
(as a user would run it), finishes in seconds, and writes JSON with the expected keys and
self-consistent numbers. They time nothing that matters; they keep the scripts runnable —
in particular ``benchmarks/gpu.py``, which is run on a lent GPU only rarely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _run(script: str, tmp_path: Path, *args: str, timeout: int = 50) -> dict:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--device", "cpu", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert out.is_file(), f"{script} wrote no JSON"
    data = json.loads(out.read_text())
    m = data["machine"]
    for key in ("date", "device", "device_name", "torch", "cpu_count"):
        assert key in m, key
    assert isinstance(data.get("table"), str) and data["table"]
    return data


def test_gpu_script_cpu_tiny(tmp_path):
    d = _run("gpu", tmp_path, "--size", "tiny")
    sys.path.insert(0, str(BENCH))
    try:
        from gpu import DEFAULT_SECTIONS
    finally:
        sys.path.remove(str(BENCH))
    assert list(d["sections"]) == DEFAULT_SECTIONS
    assert DEFAULT_SECTIONS[:2] == ["correctness", "sample_a1_T1024"] and "train" in DEFAULT_SECTIONS
    for name, s in d["sections"].items():
        assert s["status"] == "ok", (name, s.get("error"), s.get("traceback"))
    c = d["sections"]["correctness"]["result"]
    assert c["passed"] and c["complete"]
    assert all(x["token_mismatches"] == 0 and x["max_abs_exact_minus_replay"] <= 1e-4 for x in c["checks"])
    assert all(x["static_vs_cache_token_mismatches"] == 0 and x["static_graph_vs_eager_token_mismatches"] == 0 for x in c["checks"])
    s = d["sections"]["sample_a1_T1024"]["result"]
    assert s["how"] == "measured" and s["steps_measured"] == s["K"] and s["total_s"] > 0
    assert s["token_forwards_per_sample"] == s["P"] + 2 * s["N"] - s["step_sizes"][-1]
    ar = d["sections"]["sample_ar"]["result"]
    assert ar["K"] == ar["N"] and set(ar["step_sizes"]) == {1}
    t = d["sections"]["train"]["result"]
    assert set(t["variants"]) == {"hybrid", "mdm"} and t["ratios_vs_mdm"]["hybrid"]["measured"] > 0
    assert all(v["profile"]["top"] and v["profile"]["wall_ms"] > 0 for v in t["variants"].values())
    e = d["sections"]["exact"]["result"]
    assert e["exact_over_plain"] > 0 and e["token_ratio"] == pytest.approx((e["P"] + 2 * e["N"]) / (e["P"] + e["N"]))
    assert "reference" in d and d["reference"]["numbers"]["sample_a1_T1024"]["ref_s"] == 20.8


def test_train_step_script(tmp_path):
    d = _run("train_step", tmp_path, "--size", "tiny", "--repeats", "2", "--batch", "4", "--seq-len", "64")
    v, r = d["variants"], d["ratios_vs_mdm"]
    assert set(v) == {"hybrid", "hybrid_1f", "mdm", "ar"}
    assert all(x["median_s"] > 0 and len(x["times_s"]) == 2 for x in v.values())
    B, L = 4, 64
    assert v["mdm"]["tokens"] == B * L and v["ar"]["tokens"] == 2 * B * L  # AR: L clean + L query copies
    assert v["hybrid"]["forwards"] == 2 and v["hybrid_1f"]["forwards"] == 1
    assert r["hybrid"]["token_spec_full_copies"] == pytest.approx(1.5)
    assert r["hybrid"]["token_spec_masked_copies"] == pytest.approx(1.4375)
    assert 1.2 < r["hybrid"]["token_real"] < 1.7  # ≈ 1.44 up to the draw of z0


def test_sampling_script(tmp_path):
    d = _run("sampling", tmp_path, "--quick", "--ns", "32", "--ts", "4,N")
    assert [(c["N"], c["T"]) for c in d["configs"]] == [(32, 4), (32, 32)]
    for c in d["configs"]:
        tf, P, N = c["token_forwards_per_sample"], c["P"], c["N"]
        assert tf["cache"] == P + 2 * N - c["k_last"] and tf["mdlm"] == c["K"] * (P + N)
        assert set(c["methods"]) == {"cache", "static", "replay", "mdlm"}
        sizes = c["step_sizes"]
        assert sum(sizes) == N and len(sizes) == c["K"] > 1
        W = max(a + b for a, b in zip(sizes, sizes[1:]))
        assert tf["static"] == P + sizes[0] + (len(sizes) - 1) * W
        for m, r in c["methods"].items():
            assert r["median_s"] > 0 and r["same_tokens_frac"] >= 0.99, m
            assert r["token_ratio"] == pytest.approx(tf[m] / tf["cache"])
        assert "peak_bytes" in c["methods"]["cache"] and "peak_bytes" in c["methods"]["replay"]


def test_likelihood_script(tmp_path):
    d = _run("likelihood", tmp_path, "--quick", "--n", "24", "--prompt-len", "8", "--T", "8", "--repeats", "1")
    res = d["results"]["forward"]
    from esorl.likelihood import REGISTRY

    assert set(res) == {"plain"} | set(REGISTRY)  # every registered estimator, by default
    assert res["espo_elbo"]["token_ratio"] == pytest.approx(8.0) and res["step_merge"]["token_ratio"] == res["exact"]["token_ratio"]
    assert res["plain"]["time_ratio"] == pytest.approx(1.0)
    assert res["exact"]["token_ratio"] == pytest.approx((8 + 48) / (8 + 24))
    assert res["mc_elbo"]["token_ratio"] == pytest.approx(4.0)
    assert all(r["finite"] and r["median_s"] > 0 for r in res.values())


def test_gpu_recipes_script_smoke(tmp_path):
    """``gpu_recipes.py`` (run on a lent GPU: every bf16 recipe for two steps as shipped)
    keeps working: its CPU smoke mode runs two recipes under CPU bf16 autocast."""
    if not (REPO.parent / "shared" / "data" / "gsm8k").is_dir():
        pytest.skip("needs ../shared/data (the recipes' local data)")
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    res_json = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_recipes.py"), "--smoke", "--device", "cpu", "--only", "grpo_gsm8k,sft_gsm8k_owt",
                           "--out", str(tmp_path / "work"), "--json", str(res_json)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(res_json.read_text())["results"]
    assert set(res) == {"grpo_gsm8k", "sft_gsm8k_owt"} and all(r["ok"] and r["mixed_precision"] == "bf16" for r in res.values())


def test_data_shards_script_smoke(tmp_path):
    """``data_shards.py`` (issue 16's benchmark) runs at a tiny size and reports preparation
    and loading throughput and one peak-RSS figure per training configuration."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(BENCH / "data_shards.py"), "--tokens", "3e5", "--small-tokens", "5e4", "--steps", "2",
                           "--load-batches", "5", "--num-proc", "1", "--work", str(tmp_path / "w"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["corpora"]) == {"big", "small"} and all(c["prepare_tokens_per_s"] > 0 for c in r["corpora"].values())
    assert r["load_tokens_per_s"] > 0 and set(r["training_peak_rss_mb"]) == {"small-shards", "big-shards", "small-memory"}
