"""The samplers' KV caches and their bookkeeping (docs/ESOLM.md §4 b).

The model only calls ``cache.append(layer, k, v)`` and attends over what it returns; which
slots a window writes, which descriptors the cached keys carry and when clean copies are
committed is the samplers' business, and lives here with them:

- :class:`EsoKVCache` (the ``cache`` sampler, :mod:`esorl.sampling`): clean copies appended
  window by window, with their token descriptors for the attention rule;
- :class:`StaticKVCache` (the static-shape sampler, :mod:`esorl.static_sampling`): one fixed
  slot per trajectory slot, for CUDA-graph replay.
"""

from __future__ import annotations

import torch

from .attention import TokenDesc
from .configuration_esolm import EsoLMConfig


def _alloc_kv(cache, k: torch.Tensor) -> None:
    """Allocate a cache's per-layer K/V buffers on first use, in the dtype the attention
    actually computes in (bf16 under autocast even for float32 weights; float64 in tests):
    the parameters' dtype does not say which."""
    if cache.k is None:
        shape = (cache.batch_size, k.shape[1], cache.capacity, k.shape[3])
        cache.k = [torch.zeros(shape, device=k.device, dtype=k.dtype) for _ in range(cache.n_layers)]
        cache.v = [torch.zeros(shape, device=k.device, dtype=k.dtype) for _ in range(cache.n_layers)]
    elif cache.k[0].dtype != k.dtype:
        raise ValueError(f"KV cache holds {cache.k[0].dtype} keys, but this forward computes {k.dtype}: "
                         "run every step of one generation under the same precision (autocast or not)")


class EsoKVCache:
    """A preallocated KV cache of *clean copies* (docs/ESOLM.md §4 b), with their token descriptors.

    ``k[i], v[i]``: ``(B, H, capacity, D)`` per layer, allocated by the first forward in the
    dtype its attention computes in; slots ``[0, length)`` are filled. The descriptors of
    cached slots (step, rank, valid) let :mod:`esorl.attention` build the mask of a new
    window against the cache with the same rule as every other layout.
    """

    def __init__(self, config: EsoLMConfig, batch_size: int, capacity: int, device, dtype=None):
        # (``dtype`` is accepted for compatibility; the buffers take the attention's dtype)
        self.batch_size, self.n_layers = batch_size, config.n_layers
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        z = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.desc = TokenDesc(z.clone(), z.clone(), torch.zeros_like(z, dtype=torch.bool), torch.zeros_like(z, dtype=torch.bool))
        self.capacity = capacity
        self.length = 0

    def keys_desc(self, new: TokenDesc, n_write: int) -> TokenDesc:
        """Descriptors of the keys a window attends to: the cache (after writing the window's
        first ``n_write`` clean slots) followed by the window's remaining (query) slots."""
        cached = TokenDesc(
            torch.cat([self.desc.step[:, : self.length], new.step[:, :n_write]], 1),
            torch.cat([self.desc.rank[:, : self.length], new.rank[:, :n_write]], 1),
            torch.cat([self.desc.is_query[:, : self.length], new.is_query[:, :n_write]], 1),
            torch.cat([self.desc.valid[:, : self.length], new.valid[:, :n_write]], 1),
        )
        return cached.cat(new.slice(slice(n_write, None)))

    def commit_desc(self, new: TokenDesc, n_write: int) -> None:
        sl = slice(self.length, self.length + n_write)
        for dst, src in zip(self.desc.astuple(), new.astuple()):
            dst[:, sl] = src[:, :n_write]
        self.length += n_write

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write a window's K/V after the cached slots; return the keys/values to attend to.

        The window's clean copies are appended to the preallocated cache; its query copies
        are written just after them as scratch (the next window's clean copies overwrite
        them), so attention reads one contiguous view: no per-step copy of the cache. Queries
        are never *kept*: ``length`` only advances by ``n_write`` (:meth:`commit_desc`).
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} slots needed, capacity {self.capacity}")
        _alloc_kv(self, k)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class StaticKVCache:
    """A KV cache with one fixed slot per trajectory slot, for static-shape decoding.

    Slot ``j`` always holds table slot ``j`` (prompt, then completion in σ order): the clean
    copy once it is known, the query copy (scratch) during its own step. Each window writes
    its K/V at ``slots`` (a device tensor, so a captured CUDA graph can be replayed for every
    step) and attends over the first ``kv_len`` slots under a mask that hides the rest; see
    :mod:`esorl.static_sampling`. The buffers are allocated by the first (eager) forward, in
    the dtype its attention computes in, so later steps (and CUDA-graph captures) reuse them.
    """

    def __init__(self, config: EsoLMConfig, batch_size: int, capacity: int, device, dtype=None):
        self.batch_size, self.n_layers = batch_size, config.n_layers
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.capacity = capacity
        self.slots: torch.Tensor | None = None  # (W,) cache slots of the current window
        self.kv_len = capacity

    @property
    def dtype(self) -> torch.dtype | None:
        """The attention dtype, once the first forward has allocated the buffers."""
        return None if self.k is None else self.k[0].dtype

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        _alloc_kv(self, k)
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer][:, :, : self.kv_len], self.v[layer][:, :, : self.kv_len]
