"""``esorl``: the command line. One sub-command per job; ``esorl <command> --help`` for its
options. Every command exits 0 on success and non-zero on any error: an anticipated error
(bad config, missing file, refused checkpoint, diverged run, ...) prints one line
``esorl <command>: error: ...`` and exits 1 (2 for usage errors); anything else is a bug and
prints its traceback. ``--debug`` before the command shows the traceback of every error.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module[:function], one-line description)
COMMANDS = {
    "prepare-data": ("esorl.train.pretrain:prepare_data_main", "tokenize a pretraining corpus into memory-mapped shards (data.storage: shards)"),
    "pretrain": ("esorl.train.pretrain", "train an Eso-LM with the hybrid AR + MDM objective (recipes/pretrain/)"),
    "sft": ("esorl.train.sft", "supervised fine-tuning on prompt/completion pairs (recipes/sft/)"),
    "grpo": ("esorl.rl.grpo", "GRPO with exact or Monte Carlo likelihoods (recipes/rl/grpo_*.yaml)"),
    "ppo": ("esorl.rl.ppo", "PPO over denoising steps with a value head (recipes/rl/ppo_*.yaml)"),
    "compare": ("esorl.compare.runner", "the same GRPO run per likelihood estimator and seed, with a report (recipes/compare/)"),
    "sample": ("esorl.generate_cli", "generate completions from a saved model with the KV-cached sampler"),
    "score": ("esorl.generate_cli:score_main", "sample a completion and score it with every likelihood estimator"),
    "eval": ("esorl.evaluation", "accuracy, pass@k, NFEs and speed of a model on a verifiable task over a grid of sampling schedules"),
    "convert-official": ("esorl.convert.official", "convert a released Eso-LM Lightning .ckpt (no code from the file runs)"),
    "config": ("esorl.cli:config_main", "print every field of a recipe config: type, default, help"),
}

CONFIG_CLASSES = {
    "pretrain": "esorl.train.pretrain:PretrainConfig",
    "sft": "esorl.train.sft:SFTConfig",
    "grpo": "esorl.rl.grpo:GRPORecipe",
    "ppo": "esorl.rl.ppo:PPORecipe",
    "compare": "esorl.compare.runner:CompareConfig",
}


def _load(spec: str):
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr or "main")


def usage() -> str:
    from . import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: esorl [--debug] <command> [options]      (esorl {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "esorl <command> --help shows a command's options; recipe commands take --config FILE.yaml,",
              "key=value overrides (esorl config <command> lists the fields) and --resume [CHECKPOINT]."]
    return "\n".join(lines)


def config_main(argv=None):
    import argparse

    from .config import describe

    p = argparse.ArgumentParser(prog="esorl config", description="print every field of a recipe config")
    p.add_argument("kind", choices=sorted(CONFIG_CLASSES))
    a = p.parse_args(argv)
    cls = _load(CONFIG_CLASSES[a.kind])
    print("\n".join(describe(cls)))
    if cls.__doc__:
        print("\n" + cls.__doc__)


def anticipated_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, not esorl's bug: one line, no traceback."""
    errs: list[type[BaseException]] = [ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                                       PermissionError, ImportError]
    if "esorl.train.common" in sys.modules:
        from .train.common import CheckpointError, TrainingDiverged

        errs += [CheckpointError, TrainingDiverged]
    if "esorl.data.shards" in sys.modules:
        from .data.shards import ShardError

        errs.append(ShardError)
    if "esorl.train.run_dir" in sys.modules:
        from .train.run_dir import RunDirError

        errs.append(RunDirError)
    if "reward_models.combine" in sys.modules:
        from reward_models.combine import RewardFunctionError

        errs.append(RewardFunctionError)
    return tuple(errs)


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return msg.strip().replace("\n", " ") or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1]
    if debug:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"esorl {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"esorl: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from .train import run_dir

    run_dir.INVOCATION = ["esorl", cmd, *rest]  # for "resume with: ..." after an interrupt
    try:
        rc = _load(COMMANDS[cmd][0])(rest)
    except run_dir.RunInterrupted as e:  # SIGINT/SIGTERM: a checkpoint was saved
        if int(__import__("os").environ.get("RANK", "0")) == 0:
            print(f"esorl {cmd}: {e}", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"esorl {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anticipated errors become one line, bugs keep their traceback
        if debug or not isinstance(e, anticipated_errors()):
            raise
        print(f"esorl {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    _close_process_group()  # after success only: a failed rank must not wait for the others
    # a sub-command may report failure by returning a non-zero status (convert-official does)
    return int(rc) if isinstance(rc, int) and not isinstance(rc, bool) else 0


def _close_process_group() -> None:
    """Tear the distributed process group down before the interpreter exits: left to
    interpreter shutdown, a rank's communication threads can still be joinable when their
    objects are destroyed, and the process aborts ("terminate called without an active
    exception", exit -6) after a successful run."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
