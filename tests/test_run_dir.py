"""Run directories as a user meets them: one owner and one history per output directory,
Ctrl-C / SIGTERM save a checkpoint and print the command that resumes, a resumed run
continues its wandb run without repeating steps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from esorl.train.common import read_metrics
from esorl.train.pretrain import run_pretrain
from esorl.train.run_dir import LOCK, RunDirError, claim

from test_pretrain import tiny_cfg

REPO = Path(__file__).resolve().parents[1]


def test_a_second_run_into_a_used_directory_is_refused_before_work(tmp_path):
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 2}))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl, 1 checkpoint\(s\), model/\).*--resume.*--overwrite"):
        run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 2, "training.seed": 1}))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # untouched
    # --overwrite starts over: one history, steps once
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 3, "training.seed": 1}), overwrite=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3]


def test_a_live_owner_blocks_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "now", "command": "esorl pretrain ..."}))
        with pytest.raises(RunDirError, match=rf"in use by another esorl run \(pid {sleeper.pid}"):
            run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 1}))
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process is gone (as after kill -9): the lock is stale and taken over
    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 1}))
    assert not (out / LOCK).exists()  # released at the end


def test_two_concurrent_cli_runs_into_one_directory(tmp_path):
    """The reported failure: two `esorl pretrain` into one output_dir started 3 s apart both
    ran and interleaved their metrics. Now the second exits non-zero before any work."""
    cfg = _recipe(tmp_path, max_steps=400)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen([sys.executable, "-m", "esorl.cli", "pretrain", "--config", str(cfg)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (tmp_path / "run" / LOCK).exists(), first)
        second = subprocess.run([sys.executable, "-m", "esorl.cli", "pretrain", "--config", str(cfg), "training.seed=1"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "in use by another esorl run" in second.stderr and "Traceback" not in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()


def _recipe(tmp_path, **train):
    cfg = tiny_cfg(tmp_path, **{f"training.{k}": v for k, v in train.items()})
    from dataclasses import asdict

    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(asdict(cfg)))
    return f


def _wait_for(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.1)


def _steps(path):
    return [r["step"] for r in read_metrics(path) if "train/loss" in r or "reward" in r]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, sig):
    cfg = _recipe(tmp_path, max_steps=400, save_steps=100, eval_steps=0)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "esorl.cli", "pretrain", "--config", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_steps(tmp_path / "run" / "metrics.jsonl")) >= 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("esorl pretrain: pretrain stopped by"))
    stopped = int(line.split(" at step ")[1].split()[0])
    assert stopped >= 5 and f"step-{stopped:07d}" in line
    assert (tmp_path / "run" / "checkpoints" / f"step-{stopped:07d}" / "trainer_state.json").exists()  # no step lost
    cmd = line.split("Resume with: ")[1]
    assert cmd == f"esorl pretrain --config {cfg} --resume"
    # the printed command resumes (shortened so the test is quick) and the history is contiguous
    res = subprocess.run([sys.executable, "-m", "esorl.cli", *cmd.split()[1:], f"training.max_steps={stopped + 2}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _steps(tmp_path / "run" / "metrics.jsonl") == list(range(1, stopped + 3))


def test_resumed_run_continues_its_wandb_run_without_repeated_steps(tmp_path, monkeypatch):
    import wandb

    runs = []

    class FakeRun:
        def __init__(self, **kw):
            self.kw, self.steps = kw, []
            runs.append(self)

        def log(self, d, step):
            self.steps.append(step)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun(**kw))
    monkeypatch.setenv("WANDB_MODE", "offline")
    over = {"logging.wandb_mode": "offline", "training.max_steps": 5, "training.save_steps": 2, "training.eval_steps": 0}
    run_pretrain(tiny_cfg(tmp_path, **over))
    # as if it had died after logging step 5 but before its final checkpoint
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000005")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-0000004")
    shutil.rmtree(tmp_path / "run" / "model")
    run_pretrain(tiny_cfg(tmp_path, **over), resume="latest")
    assert runs[0].kw["id"] == runs[1].kw["id"] and runs[1].kw["resume"] == "allow"
    assert runs[0].steps == [1, 2, 3, 4, 5] and runs[1].steps == []  # step 5 is replayed: not sent twice
    assert _steps(tmp_path / "run" / "metrics.jsonl") == [1, 2, 3, 4, 5]


def test_grpo_sigterm_saves_and_resumes(tmp_path):
    from rl_fixtures import make_tiny_policy, recipe_dict

    pol = make_tiny_policy(tmp_path)
    d = recipe_dict(pol, tmp_path / "grpo", tmp_path / "cache", max_steps=300, save_steps=100)
    f = tmp_path / "grpo.yaml"
    f.write_text(yaml.safe_dump(d))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "esorl.cli", "grpo", "--config", str(f)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_steps(tmp_path / "grpo" / "metrics.jsonl")) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if "grpo stopped by SIGTERM at step" in ln)
    stopped = int(line.split(" at step ")[1].split()[0])
    assert (tmp_path / "grpo" / f"checkpoint-{stopped}").is_dir()
    assert line.endswith(f"Resume with: esorl grpo --config {f} --resume")
    res = subprocess.run([sys.executable, "-m", "esorl.cli", "grpo", "--config", str(f), "--resume", "grpo.max_steps=" + str(stopped + 1)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in _trl_steps(tmp_path / "grpo" / "metrics.jsonl")] == list(range(1, stopped + 2))


def _trl_steps(path):
    return [r for r in (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()) if "loss" in r]


_RACE = r"""
import sys, time
from esorl.train.run_dir import claim, RunDirError
t0 = float(sys.argv[2])
while time.time() < t0:
    pass
try:
    lock = claim(sys.argv[1], False, False)
    print("WON", flush=True)
    time.sleep(1.5)
    lock.release()
except RunDirError:
    print("REFUSED", flush=True)
"""


def test_two_runs_claiming_at_the_same_instant_one_wins(tmp_path):
    """The lock is created atomically (O_EXCL): of two runs that check an empty directory at
    the same moment, exactly one takes it."""
    for trial in range(2):
        out = tmp_path / f"d{trial}"
        start = time.time() + 2.0
        procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(out), str(start)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert results == ["REFUSED", "WON"], (trial, results)


def test_resume_command_for_each_command():
    from esorl.train import run_dir

    old = run_dir.INVOCATION
    try:
        run_dir.INVOCATION = ["esorl", "grpo", "--config", "r.yaml", "--resume", "runs/x/checkpoints/step-0000002", "grpo.max_steps=9"]
        assert run_dir.resume_command() == "esorl grpo --config r.yaml grpo.max_steps=9 --resume"
        run_dir.INVOCATION = ["esorl", "compare", "--config", "c.yaml", "seeds=[0]"]
        assert run_dir.resume_command() == "esorl compare --config c.yaml 'seeds=[0]'"  # compare continues by running again
        run_dir.INVOCATION = ["esorl", "pretrain", "--config", "p.yaml", "--overwrite"]
        assert run_dir.resume_command() == "esorl pretrain --config p.yaml --resume"
    finally:
        run_dir.INVOCATION = old


def test_an_ignored_signal_stays_ignored():
    from esorl.train.run_dir import GracefulStop

    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with GracefulStop():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_signal_after_the_last_step_is_not_swallowed(tmp_path):
    """A SIGTERM that arrives after the last step's check (during the final evaluation or save)
    used to be dropped, so a study's loop went on to its next run: now the finished run
    reports it and run_grpo raises RunInterrupted after exporting the model."""
    from esorl.config import load_config
    from esorl.rl.grpo import GRPORecipe, run_grpo
    from esorl.train.callbacks import StopOnSignal
    from esorl.train.run_dir import RunInterrupted

    from rl_fixtures import EvenIdReward, make_tiny_policy, recipe_dict

    cb = StopOnSignal()
    cb.on_train_begin(None, None, None)
    os.kill(os.getpid(), signal.SIGTERM)
    cb.on_train_end(None, None, None)
    assert cb.late == "SIGTERM" and cb.stopped == ""

    import esorl.train.callbacks as cbs

    real_end = cbs.StopOnSignal.on_train_end

    def end_with_signal(self, *a, **k):  # the signal lands during the final save
        os.kill(os.getpid(), signal.SIGTERM)
        return real_end(self, *a, **k)

    pol = make_tiny_policy(tmp_path)
    rec = load_config(GRPORecipe, None, [], base=recipe_dict(pol, tmp_path / "run", tmp_path / "cache"))
    cbs.StopOnSignal.on_train_end = end_with_signal
    try:
        with pytest.raises(RunInterrupted, match="received SIGTERM as it finished"):
            run_grpo(rec, reward_funcs=[EvenIdReward(pol)], reward_weights=[1.0])
    finally:
        cbs.StopOnSignal.on_train_end = real_end
    assert (tmp_path / "run" / "model" / "config.json").exists()
