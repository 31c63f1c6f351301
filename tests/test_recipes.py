"""Every shipped recipe loads and validates with its command's config (field names, types,
TRL's and esorl's checks), so a renamed field cannot leave a recipe stale."""

from pathlib import Path

import pytest

from esorl.cli import CONFIG_CLASSES, _load
from esorl.config import load_config

REPO = Path(__file__).resolve().parents[1]
KIND = {"pretrain": "pretrain", "sft": "sft", "compare": "compare"}


def _kind(path: Path) -> str:
    if path.parent.name == "rl":
        return path.name.split("_")[0]  # grpo_* / ppo_*
    return KIND[path.parent.name]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads(path):
    cfg = load_config(_load(CONFIG_CLASSES[_kind(path)]), path)
    assert cfg is not None
