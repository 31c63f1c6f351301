"""Shared test helpers: tiny random models (all weights non-zero, so adaLN gates and the
output layer are exercised), the reference fixtures, and random trajectories with prompts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esorl import EsoLMConfig, EsoLMModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "reference_tiny"
SST2 = SHARED / "data" / "sst2"


def tiny_model(vocab=40, hidden=32, layers=2, heads=2, context=64, dtype=torch.float64, seed=0, std=0.3) -> EsoLMModel:
    """A random tiny Eso-LM in eval mode with every parameter non-zero."""
    torch.manual_seed(seed)
    m = EsoLMModel(EsoLMConfig(vocab_size=vocab, mask_token_id=vocab - 1, hidden_size=hidden, n_layers=layers, n_heads=heads,
                               cond_dim=16, max_seq_len=context, dropout=0.0, pad_token_id=0, eos_token_id=2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return m.to(dtype).eval()


@pytest.fixture
def model64():
    return tiny_model()


def need_fixtures():
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (a clone without ../shared/)")


def need_sst2():
    if not SST2.is_dir():
        pytest.skip(f"SST-2 data not found at {SST2} (a clone without ../shared/)")


def random_prompts(B, max_len, vocab, gen, min_len=1):
    """Left-padded random prompts of mixed lengths (ids avoid 0..4 and the MASK)."""
    from esorl.sampling import left_pad

    lens = torch.randint(min_len, max_len + 1, (B,), generator=gen).tolist()
    seqs = [torch.randint(5, vocab - 1, (n,), generator=gen).tolist() for n in lens]
    return left_pad(seqs, 0)
