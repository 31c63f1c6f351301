"""An lm-evaluation-harness model type for Eso-LMs: ``lm_eval --model esolm``.

:class:`EsoLMEval` (registered as ``esolm``) answers lm-eval's three request types with an
Eso-LM saved by esorl (``save_pretrained`` directory + tokenizer):

* ``loglikelihood``: the **exact** log-likelihood of the continuation tokens given the
  context *under one stated trajectory* (order of reveal + step sizes), computed by
  :func:`esorl.likelihood.exact` in one forward pass: ``Σ_j log p_θ(y_j | context,
  tokens revealed at earlier steps)`` at temperature 1, unfiltered. It is not the marginal
  likelihood of the continuation over all orders (an Eso-LM does not give that in closed
  form), and not an ELBO. ``order=l2r`` (default) reveals one token per step left to right:
  the autoregressive factorisation under the Eso-LM attention rule, i.e. exactly what a
  causal LM would report. ``order=random`` scores under a seeded random trajectory (see
  below). ``is_greedy``: every continuation token is the argmax of its own conditional
  (the same conditionals, read from the same forward's logits).
* ``loglikelihood_rolling``: the same exact log-likelihood of a whole text, conditioned on
  the BOS token (EOS without one), cut into lm-eval's rolling windows when the text does not
  fit the context (``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window``,
  as lm-eval's HF model does); each window's continuation gets its own trajectory.
* ``generate_until``: the KV-cached sampler (:func:`esorl.sampling.generate`) following the
  same kind of trajectory (``l2r``: autoregressive decoding), ``max_gen_toks`` positions,
  greedy (``do_sample`` false / temperature 0: the argmax at every step, as top-k = 1) or
  sampled at the request's temperature (and ``top_k`` / ``top_p`` if given), seeded; the
  text is cut at the first EOS and then at the first ``until`` string.

Trajectories of ``order=random``: with ``diffusion_steps=0`` (default) a uniformly random
order, one token per step (the any-order autoregressive factorisation of that order); with
``diffusion_steps=T > 0`` the unified Eso-LM schedule ``(alpha0, T)`` of
:mod:`esorl.schedule` (diffusion steps that reveal several tokens at once, then the rest left
to right). Orders are keyed by ``(seed, the request's tokens)`` and step sizes by ``(seed,
number of tokens)``, so a request gets the same trajectory in any batch, run or process;
requests of one continuation length share step sizes, which lets them share a batch.

Token details follow lm-eval's HF model: a context is ``[BOS] + tokens(context)``
(``add_bos_token=True``, the default, as :class:`esorl.policy.EsoPolicy` encodes prompts;
an empty context is then just BOS); ``(context, continuation)`` is encoded whole and split at
the context's length, after moving the context's trailing whitespace into the continuation;
a pair longer than the model context ``max_seq_len`` loses context tokens from the left (an
Eso-LM needs ``len(context) + len(continuation) <= max_seq_len`` positions, so a
continuation may have at most ``max_seq_len - 1`` tokens). An empty continuation raises
``ValueError`` (lm-eval's HF model fails an assertion on it too).

lm-eval's CLI does not discover models in other packages, so run it through this module,
which registers ``esolm`` and then hands over to lm-eval's own command line::

    python -m esorl.lm_eval_model run --model esolm \\
        --model_args pretrained=runs/sft/model,order=l2r,dtype=float32 \\
        --tasks my_task --include_path path/to/task_yamls --batch_size 16

From Python, ``import esorl.lm_eval_model`` registers it (or pass an :class:`EsoLMEval`
instance as ``lm_eval.simple_evaluate(model=...)``).
"""

from __future__ import annotations

if __name__ == "__main__":  # pragma: no cover - exercised by a subprocess test
    # ``python -m esorl.lm_eval_model``: register the model from the package module (one class
    # object, registered once) and run lm-eval's CLI; the rest of this copy never executes.
    import sys

    from esorl.lm_eval_model import main

    sys.exit(main())

import contextlib
import hashlib
import json
import logging
from collections import defaultdict

import torch
import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: get_model() imports them only into an empty registry)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .likelihood import exact
from .modeling_esolm import model_config, unwrap
from .rollout import Rollout
from .sampling import generate, left_pad
from .schedule import ScheduleConfig, Stream, Trajectory, fixed_k, make_generator

log = logging.getLogger(__name__)

ORDERS = ("l2r", "random")
# generator purposes (other esorl purposes use 1..8)
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float64": torch.float64, "double": torch.float64,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def _keys(*token_lists) -> tuple[int, ...]:
    """Two 32-bit generator keys from a stable hash of token lists (same in every process)."""
    h = hashlib.blake2b(json.dumps([list(t) for t in token_lists]).encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


@contextlib.contextmanager
def _recorded_logits(model):
    """Record the outputs of the bare Eso-LM's forwards (to read the logits ``exact`` used)."""
    seen: list[torch.Tensor] = []

    def hook(_module, _args, out):
        seen.append((out[0] if isinstance(out, tuple) else out).detach())

    handle = unwrap(model).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@register_model("esolm")
class EsoLMEval(LM):
    """lm-eval model type ``esolm`` (see the module docstring for what each request returns).

    Args:
        pretrained: an Eso-LM ``save_pretrained`` directory (as ``esorl eval --model``) or an
            :class:`esorl.EsoLMModel` instance (used in place: moved to ``device`` / ``dtype``,
            put in eval mode; then ``tokenizer`` is required).
        tokenizer: a tokenizer directory / hub name, or a tokenizer object (default: the
            ``pretrained`` directory, loaded with :func:`esorl.data.load_tokenizer`).
        device: ``cpu``, ``cuda``, ``cuda:1`` ... (default: cuda when available).
        batch_size: requests per forward (``auto`` is not measured: it means 16); requests
            are batched by continuation length. ``max_batch_size`` is accepted and ignored.
        dtype: ``float32`` / ``float64`` / ``bfloat16`` / ``float16`` (default: as loaded).
        order: ``l2r`` (left to right, one token per step: the AR factorisation) or
            ``random`` (a seeded random trajectory, shaped by ``alpha0`` / ``diffusion_steps``).
        alpha0, diffusion_steps: ``order=random`` only: ``diffusion_steps=0`` is a uniformly
            random order with one token per step; ``T > 0`` the unified schedule ``(alpha0, T)``.
        max_gen_toks: generation length when a request does not give one.
        seed: keys every trajectory and the sampling noise.
        add_bos_token: prefix contexts with BOS (as esorl's policy encodes prompts).
        sampler: :func:`esorl.sampling.generate`'s ``method`` (``auto`` = the static KV-cached one).
        backend: attention backend (``auto`` / ``sdpa`` / ``flex``).
    """

    def __init__(self, pretrained, tokenizer=None, device: str | None = None, batch_size: int | str | None = 8,
                 max_batch_size: int | None = None, dtype: str | torch.dtype | None = None, order: str = "l2r", alpha0: float = 1.0,
                 diffusion_steps: int = 0, max_gen_toks: int = 256, seed: int = 0, add_bos_token: bool = True, sampler: str = "auto",
                 backend: str = "auto", **unknown):
        super().__init__()
        if unknown:
            raise TypeError(f"esolm: unknown model_args {sorted(unknown)}")
        if order not in ORDERS:
            raise ValueError(f"esolm: order must be one of {ORDERS}, got {order!r}")
        alpha0, diffusion_steps = float(alpha0), int(diffusion_steps)
        if order == "l2r" and (diffusion_steps != 0 or alpha0 != 1.0):
            raise ValueError("esolm: alpha0 / diffusion_steps shape order=random's trajectories; order=l2r takes neither")
        if not 0.0 <= alpha0 <= 1.0 or diffusion_steps < 0:
            raise ValueError(f"esolm: need 0 <= alpha0 <= 1 and diffusion_steps >= 0, got {alpha0}, {diffusion_steps}")
        self.order, self.alpha0, self.diffusion_steps = order, alpha0, diffusion_steps
        self.seed, self.add_bos_token, self.sampler, self.backend = int(seed), bool(add_bos_token), sampler, backend
        self._max_gen_toks = int(max_gen_toks)
        if batch_size is None or str(batch_size).startswith("auto"):
            if batch_size is not None:
                log.warning("esolm: batch_size=%s is not measured; using 16", batch_size)
            batch_size = 16
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise ValueError(f"esolm: batch_size must be >= 1, got {batch_size}")

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():
            log.warning("esolm: device %s requested but CUDA is not available; using cpu", device)  # lm-eval's CLI default is cuda:0
            self._device = torch.device("cpu")
        from .modeling_esolm import EsoLMModel

        if isinstance(pretrained, torch.nn.Module):
            model, self._name = pretrained, type(unwrap(pretrained)).__name__
            if tokenizer is None:
                raise ValueError("esolm: pass tokenizer= with a model instance")
        else:
            from .configuration_esolm import check_model_dir

            check_model_dir(pretrained, "pretrained")
            model, self._name = EsoLMModel.from_pretrained(str(pretrained)), str(pretrained)
        if tokenizer is None or isinstance(tokenizer, str):
            from .data import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer or pretrained))
        if isinstance(dtype, str) and dtype not in ("auto", ""):
            if dtype not in _DTYPES:
                raise ValueError(f"esolm: dtype must be one of {sorted(_DTYPES)} or auto, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.model = model.to(self._device, **({"dtype": dtype} if isinstance(dtype, torch.dtype) else {})).eval()
        self.tokenizer = tokenizer
        self.config = model_config(self.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = 0
        if self.prefix_token_id is None:
            raise ValueError("esolm: the tokenizer has neither a BOS nor an EOS token to condition an empty context on")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``model_args`` win over lm-eval's run-wide settings (``--device``, ``--batch_size``,
        whose CLI defaults are always passed), instead of clashing with them."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------ properties (lm-eval)

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_length(self) -> int:
        """Positions the model has: context + continuation must fit."""
        return int(self.config.max_seq_len)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        """The token an empty context (and rolling windows) condition on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "esolm_order": self.order, "esolm_alpha0": self.alpha0,
                "esolm_diffusion_steps": self.diffusion_steps, "esolm_seed": self.seed}

    # ------------------------------------------------------------------ tokens

    def tok_encode(self, text: str) -> list[int]:
        """Tokens of ``text``, no special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _context_prefix(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if self.add_bos_token and bos is not None else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context tokens, continuation tokens)`` as lm-eval's HF model splits them (before
        truncation): trailing whitespace of the context moves to the continuation, the whole
        string is encoded and split at the context's token count; the context gets the
        BOS prefix, and an empty one is ``[prefix_token_id]``."""
        n_sp = len(context) - len(context.rstrip())
        if n_sp:
            continuation, context = context[-n_sp:] + continuation, context[:-n_sp]
        ctx = self.tok_encode(context) if context else []
        cont = self.tok_encode(context + continuation)[len(ctx):] if context else self.tok_encode(continuation)
        ctx = self._context_prefix() + ctx
        return (ctx or [self.prefix_token_id]), cont

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate a pair to ``max_length`` positions (at least one context token)."""
        if not cont:
            raise ValueError("esolm: empty continuation: there is nothing to score (lm-eval's HF model rejects it too)")
        L = self.max_length
        if len(cont) > L - 1:
            raise ValueError(f"esolm: a continuation of {len(cont)} tokens does not fit the model context max_seq_len={L} "
                             "(at most max_seq_len - 1 tokens, after one context token)")
        if len(ctx) + len(cont) > L:
            _warn_once(f"esolm: context + continuation exceed max_seq_len={L}: context tokens are dropped from the left")
            ctx = ctx[len(ctx) + len(cont) - L:]
        return ctx, cont

    # ------------------------------------------------------------------ trajectories

    def trajectory(self, pairs: list[tuple[list[int], list[int]]]) -> Trajectory:
        """The trajectory under which ``(context tokens, continuation tokens)`` pairs of one
        continuation length ``N`` are scored: ``l2r``: ``σ = 0..N-1``, one token per step;
        ``random``: orders keyed by each pair's tokens, step sizes by ``N``."""
        B, N = len(pairs), len(pairs[0][1])
        if any(len(c) != N for _, c in pairs):
            raise ValueError("esolm.trajectory: pairs must share one continuation length")
        if self.order == "l2r":
            return Trajectory(torch.arange(N).expand(B, N).clone(), torch.ones(N, dtype=torch.long))
        rows = [make_generator(self.seed, Stream.LL_ORDER, *_keys(c, x)) for c, x in pairs]
        return self._random(B, N, rows, make_generator(self.seed, Stream.LL_SIZES, N))

    def _random(self, B: int, N: int, rows, sizes_gen) -> Trajectory:
        if self.diffusion_steps == 0:
            return fixed_k(B, N, 1, row_generators=rows)
        return ScheduleConfig(kind="unified", alpha0=self.alpha0, num_steps=self.diffusion_steps).sample(B, N, sizes_gen, rows)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of each (already fitted) token pair: batches of one
        continuation length (they share step sizes), longest contexts first."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        by_len = defaultdict(list)
        for i, (_, cont) in enumerate(pairs):
            by_len[len(cont)].append(i)
        bar = tqdm(total=len(pairs), disable=disable_tqdm, desc="esolm loglikelihood")
        for n in sorted(by_len, reverse=True):
            idx = sorted(by_len[n], key=lambda i: -len(pairs[i][0]))
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b : b + self.batch_size]
                for i, r in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                    out[i] = r
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _score_batch(self, pairs) -> list[tuple[float, bool]]:
        pid, pm = left_pad([c for c, _ in pairs], self.pad_id, self.device)
        comp = torch.tensor([x for _, x in pairs], dtype=torch.long, device=self.device)
        ro = Rollout.from_tokens(pid, pm, comp, self.trajectory(pairs), eos_token_id=self.eot_token_id)
        with _recorded_logits(self.model) as seen:
            lp, valid = exact(self.model, ro, kind="model", temperature=1.0, backend=self.backend)
        if len(seen) != 1 or tuple(seen[0].shape[:2]) != tuple(comp.shape):
            raise RuntimeError(f"esolm: expected one forward with query logits {tuple(comp.shape)}, saw {[tuple(s.shape) for s in seen]}")
        # exact's queries are in σ order: query i predicts the token at position order[:, i]
        greedy = (seen[0].argmax(-1) == comp.gather(1, ro.order)).all(1)
        total = (lp.to(torch.float64) * valid).sum(1)
        return [(float(t), bool(g)) for t, g in zip(total.tolist(), greedy.tolist())]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._fit(*self.encode_pair(*req.args)) for req in requests]
        res = self.score_tokens(pairs, disable_tqdm=disable_tqdm)
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            # windows of at most max_length positions: lm-eval's max_seq_len counts the
            # inputs of a causal LM (one fewer than the positions a pair needs here)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1, context_len=1)):
                windows.append(self._fit(list(ctx), list(cont)))
                owner.append(k)
        scores = self.score_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    # ------------------------------------------------------------------ generation

    def _gen_settings(self, gen_kwargs: dict) -> dict:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        n = next((kw.pop(a) for a in ("max_gen_toks", "max_new_tokens", "max_tokens") if a in kw), self.max_gen_toks)
        for a in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            kw.pop(a, None)
        do_sample = kw.pop("do_sample", None)
        # lm-eval's convention: greedy unless do_sample (or, without do_sample, temperature > 0);
        # do_sample=True without a temperature samples at temperature 1
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
        sample = temperature > 0 if do_sample is None else bool(do_sample) and temperature > 0
        if do_sample and temperature == 0:
            _warn_once("esolm: do_sample=True with temperature 0: decoding greedily")
        top_k, top_p = int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0)
        if kw:
            _warn_once(f"esolm: ignoring generation kwargs {sorted(kw)}")
        n = int(n)
        if n < 1 or n >= self.max_length:
            raise ValueError(f"esolm: max_gen_toks={n} must be in [1, max_seq_len={self.max_length})")
        if sample:
            return {"until": until, "n": n, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        return {"until": until, "n": n, "temperature": 1.0, "top_k": 1, "top_p": 1.0}  # greedy: argmax at every step

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups, seen = defaultdict(list), defaultdict(int)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            occurrence = seen[(context, key)]  # repeats of one request get different noise
            seen[(context, key)] += 1
            groups[key].append((i, context, occurrence))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="esolm generate_until")
        for key, items in groups.items():
            s = self._gen_settings(requests[items[0][0]].args[1])
            n = s["n"]
            room = self.max_length - n
            enc = []
            for i, context, occ in items:
                ids = self._context_prefix() + self.tok_encode(context)
                ids = ids or [self.prefix_token_id]
                if len(ids) > room:
                    _warn_once(f"esolm: contexts longer than max_seq_len - max_gen_toks = {room} tokens lose tokens on the left")
                    ids = ids[-room:]
                enc.append((i, ids, occ))
            enc.sort(key=lambda e: -len(e[1]))
            for b in range(0, len(enc), self.batch_size):
                chunk = enc[b : b + self.batch_size]
                for (i, _, _), text in zip(chunk, self._generate_batch(chunk, s)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _generate_batch(self, chunk, s: dict) -> list[str]:
        B, n = len(chunk), s["n"]
        pid, pm = left_pad([ids for _, ids, _ in chunk], self.pad_id, self.device)
        keys = [_keys(ids, [occ, n]) for _, ids, occ in chunk]
        if self.order == "l2r":
            traj = Trajectory(torch.arange(n).expand(B, n).clone(), torch.ones(n, dtype=torch.long))
        else:
            traj = self._random(B, n, [make_generator(self.seed, Stream.GEN_ORDER, *k) for k in keys],
                                make_generator(self.seed, Stream.GEN_SIZES, n))
        u = torch.stack([torch.rand(n, generator=make_generator(self.seed, Stream.GEN_NOISE, *k), dtype=torch.float64) for k in keys])
        ro = generate(self.model, pid, pm, n, traj, s["temperature"], s["top_k"], s["top_p"], uniforms=u, eos_token_id=self.eot_token_id,
                      method=self.sampler, backend=self.backend)
        texts = ro.texts(self.tokenizer)  # cut at the first EOS
        return [_cut(t, s["until"]) for t in texts]


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any non-empty stop string."""
    cuts = [text.find(u) for u in until if u]
    cuts = [c for c in cuts if c >= 0]
    return text[: min(cuts)] if cuts else text


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with ``esolm`` registered (``python -m esorl.lm_eval_model ...``,
    same arguments as ``lm_eval``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0
