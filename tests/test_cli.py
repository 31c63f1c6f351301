"""The console script as a user meets it, run in a temporary directory: every sub-command
exits non-zero on a failing input with one line naming the problem (no traceback), --help is
fast and lists every command, --version exists."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


def esorl(*args, cwd, timeout=300):
    exe = shutil.which("esorl")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "esorl.cli", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(res, *needles):
    assert res.returncode != 0, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


def test_help_version_and_unknown_command(tmp_path):
    t0 = time.time()
    res = esorl("--help", cwd=tmp_path)
    took = time.time() - t0
    assert res.returncode == 0
    for cmd in ("pretrain", "sft", "grpo", "ppo", "compare", "sample", "score", "convert-official", "config"):
        assert f"\n  {cmd} " in res.stdout, cmd
    assert "`" not in res.stdout  # no reStructuredText markup
    assert took < 3.0, f"esorl --help took {took:.1f} s (it must not import torch)"
    assert esorl("--version", cwd=tmp_path).stdout.startswith("esorl ")
    one_line_error(esorl("pretrian", cwd=tmp_path), "unknown command 'pretrian'")


def test_recipe_commands_need_a_config(tmp_path):
    for cmd in ("pretrain", "sft", "grpo", "ppo", "compare"):
        res = esorl(cmd, cwd=tmp_path)
        one_line_error(res, "--config")
        assert res.returncode == 2 and not (tmp_path / "runs").exists(), cmd
    one_line_error(esorl("grpo", "--config", "missing.yaml", cwd=tmp_path), "missing.yaml: no such file")


@pytest.mark.parametrize("cmd,override,needle", [
    ("pretrain", "training.max_stepz=3", "training.max_stepz"),
    ("sft", "training.learning_rate=fast", "training.learning_rate"),
    ("grpo", "grpo.num_generations=1", "at least 2 generations per prompt"),
    ("ppo", "ppo.learning_rat=1", "ppo.learning_rat"),
    ("compare", "seeds=[0]", "compare"),
])
def test_recipe_commands_bad_field_exit_non_zero(tmp_path, cmd, override, needle):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("{}\n" if cmd != "sft" else "model: {init_from: nowhere}\n")
    res = esorl(cmd, "--config", str(cfg), override, cwd=tmp_path)
    if cmd == "compare":  # an empty compare recipe fails on its missing policy, not on a traceback
        one_line_error(res)
    else:
        one_line_error(res, needle)
    assert not (tmp_path / "runs").exists()


def test_sample_and_score_errors(tmp_path):
    one_line_error(esorl("sample", "--model", str(tmp_path / "nope"), cwd=tmp_path), "no such directory")
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text('{"model_type": "esolm"}')
    one_line_error(esorl("sample", "--model", str(tmp_path / "run"), cwd=tmp_path), "did you mean")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    one_line_error(esorl("score", "--model", str(tmp_path / "bert"), cwd=tmp_path), "'bert' model, not an Eso-LM")
    one_line_error(esorl("sample", "--model", "x", "--max-completion-length", "-3", cwd=tmp_path), "--max-completion-length: must be >= 1")
    one_line_error(esorl("sample", "--model", "x", "--max-completion-length", "0", cwd=tmp_path), "--max-completion-length: must be >= 1")
    one_line_error(esorl("score", "--model", "x", "--likelihood", "exact,nope", cwd=tmp_path), "unknown ['nope']", "mc_elbo")


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_convert_official_refusals_exit_non_zero(tmp_path):
    """Regression: the converter refused a hostile or missing file but `esorl` exited 0."""
    one_line_error(esorl("convert-official", str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), cwd=tmp_path), "missing.ckpt")
    _Boom.marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    import torch

    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Boom()}, bad)  # a real checkpoint with a hostile global
    res = esorl("convert-official", str(bad), str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode != 0 and "system" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not _Boom.marker.exists() and not (tmp_path / "out" / "config.json").exists()


def test_config_command(tmp_path):
    res = esorl("config", "grpo", cwd=tmp_path)
    assert res.returncode == 0 and "grpo.learning_rate" in res.stdout
    assert esorl("config", "nope", cwd=tmp_path).returncode == 2


def test_policy_paths_are_checked_for_what_they_must_be(tmp_path):
    """policy.init_from pointing at a missing directory, at a run directory instead of
    <run>/model, or at a BERT directory: one line saying so, before any work."""
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text('{"model_type": "esolm"}')
    (tmp_path / "run" / "model" / "model.safetensors").write_bytes(b"")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert", "hidden_size": 128}')
    for init_from, needle in ((tmp_path / "nope", "no such directory"), (tmp_path / "run", "did you mean"),
                              (tmp_path / "bert", "'bert' model, not an Eso-LM")):
        f = tmp_path / "r.yaml"
        f.write_text(f"policy: {{init_from: {init_from}}}\nrewards: [{{name: keyword}}]\n")
        res = esorl("grpo", "--config", str(f), cwd=tmp_path)
        one_line_error(res, "policy.init_from", needle)
        assert not (tmp_path / "runs").exists()


def test_missing_local_data_says_how_to_get_it(tmp_path):
    from esorl.data import load_text_dataset

    with pytest.raises(FileNotFoundError, match=r"does not exist\. This is the SST-2.*'stanfordnlp/sst2'"):
        load_text_dataset(str(tmp_path / "shared" / "data" / "sst2"))


def test_own_reward_function_from_the_working_directory_and_a_file(tmp_path):
    """`rewards: [{name: my_rewards:ok}]` with ./my_rewards.py used to fail with
    ModuleNotFoundError from the console script; a file path works too."""
    from esorl.rl.common import RewardSpec, build_reward

    (tmp_path / "my_rewards.py").write_text("def ok(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.py").write_text("def half(prompts, completions, **kw):\n    return [0.5] * len(completions)\n")
    code = ("import sys; from esorl.rl.common import RewardSpec, build_reward; "
            "print(build_reward(RewardSpec(name='my_rewards:ok'))(['a'], ['b']), build_reward(RewardSpec(name='sub/other.py:half'))(['a'], ['b']))")
    exe = shutil.which("esorl")
    py = str(Path(exe).with_name("python")) if exe else sys.executable
    res = subprocess.run([py, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert res.returncode == 0 and "[1.0] [0.5]" in res.stdout, res.stderr[-2000:]
    with pytest.raises(ValueError, match="unknown reward 'sentimental'"):
        RewardSpec(name="sentimental").validate()
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_reward(RewardSpec(name=str(tmp_path / "missing.py") + ":f"))


def test_grpo_set_up_errors_come_before_any_work_and_output_is_named(tmp_path):
    """num_generations not dividing the batch, and a completion length that fills the
    context, fail before a run directory exists; a finished run says where its output went."""
    sys.path.insert(0, str(Path(__file__).parent))
    import yaml

    from rl_fixtures import make_tiny_policy, recipe_dict

    pol = make_tiny_policy(tmp_path)
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump(recipe_dict(pol, tmp_path / "out", tmp_path / "cache", max_steps=1)))
    one_line_error(esorl("grpo", "--config", str(f), "grpo.num_generations=7", cwd=tmp_path), "must be divisible by num_generations (7)")
    one_line_error(esorl("grpo", "--config", str(f), "grpo.max_completion_length=48", cwd=tmp_path), "leaves no room for a prompt")
    assert not (tmp_path / "out").exists()
    res = esorl("grpo", "--config", str(f), cwd=tmp_path)
    assert res.returncode == 0 and f"GRPO finished: metrics, checkpoints and model in {tmp_path / 'out'}" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("cmd,old,new", [
    ("sample", "--steps", "--diffusion-steps"), ("sample", "--alpha0", "--sampling-alpha0"), ("sample", "--num-samples", "--num-generations"),
    ("score", "--estimators", "--likelihood"), ("eval", "--max-new-tokens", "--max-completion-length"), ("eval", "--samples", "--num-generations"),
])
def test_old_flags_are_usage_errors_naming_the_new_ones(tmp_path, cmd, old, new):
    extra = ["--task", "mini_sudoku"] if cmd == "eval" else []
    res = esorl(cmd, "--model", "x", *extra, old, "3", cwd=tmp_path)
    one_line_error(res, f"{old} was renamed to {new}")
    assert res.returncode == 2
