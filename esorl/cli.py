"""``esorl``: one command, several sub-commands.

    esorl pretrain --config recipes/pretrain/synthetic_cpu.yaml [key=value ...] [--resume]
    esorl sft      --config recipes/sft/<name>.yaml [key=value ...]
    esorl grpo     --config recipes/rl/<name>.yaml  [key=value ...]
    esorl ppo      --config recipes/rl/<name>.yaml  [key=value ...]
    esorl compare  --config recipes/compare/<name>.yaml [key=value ...]
    esorl sample   --model DIR --prompt TEXT [--alpha0 --steps --top-p ...]
    esorl score    --model DIR --prompt TEXT [--estimators exact,mc_elbo,...]
    esorl convert-official FILE.ckpt OUT_DIR [--no-ema]
    esorl config   {pretrain,sft,grpo,ppo,compare}   # every config field, its type, default and help
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pretrain": "esorl.train.pretrain",
    "sft": "esorl.train.sft",
    "grpo": "esorl.rl.grpo",
    "ppo": "esorl.rl.ppo",
    "compare": "esorl.compare.runner",
    "sample": "esorl.generate_cli",
    "score": "esorl.generate_cli:score_main",
    "convert-official": "esorl.convert.official",
    "config": "esorl.cli:config_main",
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"esorl: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from .config import ConfigError

    try:
        _load(COMMANDS[cmd])(rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"esorl {cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
