"""GRPO for Eso-LMs as a subclass of TRL's ``GRPOTrainer`` (TRL 1.16).

Use it as TRL's trainer::

    from esorl.rl import EsoGRPOConfig, EsoGRPOTrainer
    trainer = EsoGRPOTrainer(model="runs/pretrain/model", reward_funcs=[my_reward],
                             args=EsoGRPOConfig(output_dir="runs/grpo", likelihood="exact"),
                             train_dataset=dataset)            # a datasets.Dataset with a "prompt" column
    trainer.train()

Everything that is not Eso-LM specific is TRL's: the data loader and its prompt groups, the
reward contract (``f(prompts, completions, completion_ids, trainer_state, log_extra,
log_metric, **columns)``), advantages (``scale_rewards``, ``multi_objective_aggregation``),
every loss type, clipping (``epsilon``, ``epsilon_high``, ``delta``), the KL to a reference
(``beta``, ``sync_ref_model``, PEFT's disabled adapters), ``top_entropy_quantile`` and the
entropy bonus, metrics, callbacks, ``Trainer`` checkpoints and resume, evaluation,
accumulation, DDP and DeepSpeed. Four hooks are replaced (see ``docs/ESOLM.md`` §6-7 for the
semantics):

``_generate``
    rollouts come from esorl's KV-cached sampler (:meth:`esorl.policy.EsoPolicy.generate`).
    A rollout is ``N = max_completion_length`` tokens; each one is sampled, so each one counts
    in the loss (the trajectory's log-probability includes tokens after the first EOS: in
    diffusion order they may be revealed early and condition earlier positions). The text the
    reward functions see stops at the first EOS in position order (``completions``), and so do
    the ``completion_ids`` they receive (EOS included, as TRL's). "Truncated"
    (``mask_truncated_completions``, ``completions/clipped_ratio``) means *no EOS among the N
    tokens*. The same semantics hold in PPO and in the comparison.
``_generate_and_score_completions``
    TRL's, plus the rollout's order σ, per-token step indices and step sizes as per-sample
    tensors (so that TRL's shuffle and split of the generation batch carry them to every
    micro-batch), and the old / reference log-probs under the chosen estimator (below).
``_compute_loss``
    TRL's loss on the micro-batch, with the log-probs and entropies of
    ``_get_per_token_logps_and_entropies`` computed by the estimator on the micro-batch's
    rollout instead of a left-to-right forward.
``_get_per_token_logps_and_entropies``
    the chosen estimator (``likelihood``): per-token log-probs ``[B, N]`` and the entropy of
    the predictive distribution each one was read from ``[B, N]`` (TRL's ``entropy`` metric,
    ``top_entropy_quantile`` and ``entropy_coef`` use it).

Old and reference log-probs
    ``exact``: the old log-probs are the sampler's recorded ones (no extra forward, spec: the
    exact log-probs *are* the sampler's); the reference is scored once per generation batch.
    Monte Carlo estimators: one noise seed per (generation batch, inner iteration ``μ``),
    derived from ``(seed, global_step at generation, iteration)`` and shared by the current,
    old and reference passes of that iteration; when TRL needs old log-probs (``μ > 1``, or
    more micro-batches per generation than per optimizer step), they are scored before any
    update under every iteration's seed; with ``μ = 1`` and aligned steps they are the current
    ones detached (ratio 1), as in TRL.

Same rollouts on any number of ranks
    Rollout noise is keyed by ``(seed, global_step at generation, sample id)`` where the
    sample id is the completion's position in the *global* generation batch (rank ``r`` holds
    positions ``r·n … (r+1)·n − 1``, as TRL's ``process_slice``), and TRL's sampler yields the
    same global batch for the same ``generation_batch_size``. So 1 process × 8 completions
    and 2 ranks × 4 see identical prompts, rollouts and rewards.

Not supported (refused at construction): vLLM / transformers continuous batching (the sampler
is esorl's), tools and environments, multimodal prompts, conversational prompts without a
chat template (the policy is a plain LM: pass text prompts).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..modeling_esolm import EsoLMModel, unwrap
from ..policy import EsoPolicy, EstimatorConfig
from .common import LOG_RATIO_CLAMP, peak_memory_mb
from ..rollout import Rollout, first_eos_mask
from ..sampling import SamplingConfig
from ..schedule import ScheduleConfig, Stream, make_generator
from ..train.callbacks import RecordsGradNorm

# transformers 5.24 renamed gradient_checkpointing to activation_checkpointing; TRL 1.16 and
# peft still use the old names (which work): their warning says nothing a user can act on
warnings.filterwarnings("ignore", message=r".*(is_)?gradient_checkpointing.* is deprecated", category=FutureWarning)

# random-stream purposes of this module (see esorl.schedule.make_generator)
# the eval rollouts use their own seed stream, fixed across evaluations (common random numbers)
_EVAL_SEED_OFFSET = 99991


# TRL 1.16's loss types; all of them act on per-token log-probs and are meaningful with every
# estimator (tests/test_grpo.py checks each against its definition)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


@dataclass
class EsoGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the Eso-LM fields (every TRL field keeps its name and meaning).

    Defaults that differ from TRL's: ``disable_dropout = True`` (sampling and scoring must see
    the same function, or the ratio of an exact run is not 1 at the first iteration).
    """

    likelihood: str = field(default="exact", metadata={"help": "Likelihood estimator of the loss: exact | replay | mc_elbo | one_step | coupled | "
                                                           "elbo_lowvar | espo_elbo | step_merge (docs/ESOLM.md §6; esorl.likelihood.REGISTRY)."})
    mc_samples: int = field(default=4, metadata={"help": "mc_elbo / elbo_lowvar / espo_elbo (and the spg objective): Monte Carlo draws n per sequence."})
    p_mask: float = field(default=0.15, metadata={"help": "one_step: prompt mask rate (d1's runs: 0.15)."})
    merge_segments: int = field(default=2, metadata={"help": "step_merge: segments the trajectory's steps are merged into (d2's StepMerge)."})
    objective: str = field(default="grpo", metadata={"help": "Policy objective: grpo (TRL's loss, loss_type chooses the variant) | espo (sequence-level "
                                                     "ELBO ratio, k2 KL) | spg (sandwiched bounds, likelihood elbo_lowvar, beta 0) | wd1 (ratio-free "
                                                     "weighted likelihood, beta 0). esorl.rl.objectives; docs/ESOLM.md §10."})
    spg_eubo_beta: float = field(default=1.0, metadata={"help": "spg: order β of the Rényi upper bound (SPG's runs: 1.0 Sudoku, 1.5 GSM8K/MATH, 2.0 Countdown)."})
    spg_mix_weight: float = field(default=0.5, metadata={"help": "spg: weight ω of the upper bound for negative advantages (1 = pure upper bound, SPG's mix: 0.5)."})
    wd1_psi: float = field(default=1.0, metadata={"help": "wd1: inverse temperature ψ of the softmax weights of the advantages (wd1's code: 1)."})
    sampling_alpha0: float = field(default=1.0, metadata={"help": "Sampling schedule α0: the share of the completion revealed by diffusion steps (1 = pure MDM, 0 = left to right)."})
    diffusion_steps: int = field(default=8, metadata={"help": "Sampling schedule T: denoising steps for the diffusion part."})
    schedule_kind: str = field(default="unified", metadata={"help": "Step-size schedule: unified (the paper's) | uniform | ..."})
    attention_backend: str = field(default="auto", metadata={"help": "Attention backend: auto | sdpa | flex | eager."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout (TRL's field; on by default for Eso-LMs)."})
    log_exact_kl: bool = field(default=False, metadata={"help": "Log exact_kl: the KL of the policy's trajectories to the reference's, measured with the "
                                                        "exact likelihood whatever the loss's estimator (one reference forward per generation batch; "
                                                        "with beta = 0 and no PEFT a frozen copy of the initial weights is kept). The comparison's common KL."})

    def __post_init__(self):
        if self.bf16 is None:
            # TRL's default (bf16 unless fp16) where bf16 is fast; full precision on CPU
            self.bf16 = (not self.fp16) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not torch.cuda.is_available():
            import os

            deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            several = int(os.environ.get("WORLD_SIZE", "1")) > 1
            if self.bf16 or (several and not deepspeed):
                # bf16 autocast without CUDA, or several CPU ranks (DDP): transformers and
                # accelerate need use_cpu for both (an accelerate config's `use_cpu: true` does not
                # reach the ranks it starts)
                self.use_cpu = True
            if several and self.ddp_backend is None:
                self.ddp_backend = "gloo"  # CPU ranks, DeepSpeed's included
        super().__post_init__()
        # TRL checks these only when the first loss is computed: fail before any work instead
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)} (TRL 1.16), got {self.loss_type!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"grpo.importance_sampling_level must be token or sequence, got {self.importance_sampling_level!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"grpo.scale_rewards must be group, batch, none, true or false, got {self.scale_rewards!r}")
        self.estimator().validate()
        self.sampling().validate()
        from .objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(f"grpo.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective in ("spg", "wd1") and self.beta != 0.0:
            raise ValueError(f"grpo.objective {self.objective} has no KL term (as its authors' code): set grpo.beta: 0.0, got {self.beta}")
        if self.objective == "spg" and self.likelihood != "elbo_lowvar":
            raise ValueError(f"grpo.objective spg reads its bounds from elbo_lowvar's masks: set grpo.likelihood: elbo_lowvar, got {self.likelihood!r}")
        if self.objective == "spg" and not (self.spg_eubo_beta > 0 and 0.0 <= self.spg_mix_weight <= 1.0):
            raise ValueError(f"grpo.spg_eubo_beta must be > 0 and grpo.spg_mix_weight in [0, 1], got {self.spg_eubo_beta}, {self.spg_mix_weight}")
        if self.use_vllm or self.use_transformers_continuous_batching or self.use_transformers_paged:
            raise ValueError("EsoGRPOConfig: use_vllm / transformers continuous batching are not supported: Eso-LM rollouts come from esorl's KV-cached sampler")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"EsoGRPOConfig.max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(f"EsoGRPOConfig.num_generations must be >= 2 (advantages are group-relative), got {self.num_generations}")

    def estimator(self) -> EstimatorConfig:
        """The estimator settings (:class:`esorl.policy.EstimatorConfig`)."""
        return EstimatorConfig(self.likelihood, self.mc_samples, self.p_mask, merge_segments=self.merge_segments)

    def sampling(self) -> SamplingConfig:
        """The sampler settings: ``max_completion_length`` tokens along the ``(α0, T)`` schedule."""
        return SamplingConfig(self.max_completion_length, ScheduleConfig(kind=self.schedule_kind, alpha0=self.sampling_alpha0, num_steps=self.diffusion_steps),
                              self.temperature, self.top_k, self.top_p)


# keys of the per-sample rollout tensors added to TRL's generation output (each [B, ...])
_ORDER, _STEPS, _SIZES, _IDS, _OLD, _REF = "eso_order", "eso_steps", "eso_step_sizes", "eso_sample_ids", "eso_old_logps", "eso_ref_logps"
_SAMPLER = "eso_sampler_logps"  # the sampler's recorded (model) log-probs, [B, N]
_WD1 = "eso_wd1_weight"  # wd1's per-completion weight, computed on whole groups before TRL's shuffle, [B]
_RUN_FILE = "esorl_run.json"  # in every checkpoint: the settings a resume must keep


class EsoGRPOTrainer(RecordsGradNorm, GRPOTrainer):
    """``trl.GRPOTrainer`` over Eso-LM rollouts with exact or Monte Carlo likelihoods.

    Args: as ``trl.GRPOTrainer`` (``model`` an :class:`~esorl.EsoLMModel` or its directory,
    ``reward_funcs``, ``args`` an :class:`EsoGRPOConfig`, ``train_dataset`` / ``eval_dataset``
    with a text ``prompt`` column, ``processing_class`` the tokenizer (default: loaded from
    the model directory), ``callbacks``, ``optimizers``, ``peft_config``).
    """

    _tag_names = ["trl", "grpo", "esorl", "eso-lm"]

    def __init__(self, model, reward_funcs, args: EsoGRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None, **kwargs):
        if args is None:
            args = EsoGRPOConfig(output_dir="trainer_output")
        if not isinstance(args, EsoGRPOConfig):
            raise TypeError(f"EsoGRPOTrainer: args must be an EsoGRPOConfig (trl.GRPOConfig plus the Eso-LM fields), got {type(args).__name__}")
        for k in ("rollout_func", "tools", "environment_factory"):
            if kwargs.get(k) is not None:
                raise ValueError(f"EsoGRPOTrainer: {k} is not supported (rollouts come from esorl's sampler)")
        if isinstance(model, str):
            model = EsoLMModel.from_pretrained(model)
        if not isinstance(unwrap(model), EsoLMModel):
            raise TypeError(f"EsoGRPOTrainer: model must be an EsoLMModel or its directory, got {type(model).__name__}")
        # exact_kl needs the initial weights when TRL keeps no reference (beta = 0, no PEFT):
        # copied now, before a resume loads a checkpoint into the model
        self._kl_ref_model = None
        if args.log_exact_kl and args.beta == 0.0 and peft_config is None:
            import copy

            self._kl_ref_model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        if args.disable_dropout:
            # TRL's disable_dropout_in_model zeroes nn.Dropout modules; the Eso-LM blocks apply
            # F.dropout with their own rate, so zero those (the saved config keeps its value)
            for m in unwrap(model).modules():
                if isinstance(getattr(m, "dropout", None), float):
                    m.dropout = 0.0
        if processing_class is None:
            from ..data import load_tokenizer

            processing_class = load_tokenizer(model.config._name_or_path)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config, **kwargs)
        from ..train.callbacks import MetricsJSONL, NonFiniteGradients

        self.nonfinite = NonFiniteGradients(self)
        self.add_callback(self.nonfinite)  # before the JSONL writer: it adds train/skipped_updates to the record
        self.add_callback(MetricsJSONL(args.output_dir))
        self.estimator_cfg = args.estimator()
        self.policy = EsoPolicy(self.model, processing_class, args.sampling(), self.accelerator, args.attention_backend)
        self._generating = False  # inside TRL's generation: its old/ref scoring calls are answered by us afterwards
        self._micro_rollout: Rollout | None = None  # the micro-batch the current loss is computed on
        self._micro_inputs: dict | None = None
        self._micro_seed = 0

    # ------------------------------------------------------------------ noise keys
    def estimator_seed(self, gen_step: int, iteration: int) -> int:
        """The Monte Carlo noise seed of inner iteration ``iteration`` of the generation batch
        sampled at ``global_step = gen_step``; shared by its current, old and reference passes."""
        g = make_generator(self.args.seed, Stream.EST, gen_step, iteration)
        return int(torch.randint(0, 2**31 - 1, (1,), generator=g))

    def _updates_per_generation(self) -> int:
        return max(1, self.args.steps_per_generation * self.num_iterations // self.args.gradient_accumulation_steps)

    def _generation_step(self) -> int:
        """``global_step`` at which the current generation batch was sampled (restored on resume)."""
        u = self._updates_per_generation()
        return self.state.global_step // u * u

    def _iteration(self) -> int:
        """Inner iteration (0 … μ−1) of the current micro-batch (TRL's buffer index logic)."""
        return (self._step % (self.args.steps_per_generation * self.num_iterations)) // self.args.steps_per_generation

    # ------------------------------------------------------------------ rollouts
    def _generate(self, prompts: list):
        """TRL's generation seam, answered by the Eso-LM sampler (see the module docstring)."""
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("EsoGRPOTrainer: prompts must be plain text (the Eso-LM policy has no chat template)")
        mode = "train" if self.model.training else "eval"
        n = len(prompts)
        rank = self.accelerator.process_index
        sample_ids = torch.arange(rank * n, (rank + 1) * n)
        if mode == "train":
            seed, step = self.args.seed, self._generation_step()
        else:
            seed, step = self.args.seed + _EVAL_SEED_OFFSET, 0
        t0 = time.perf_counter()
        ro = self.policy.generate(prompts, seed, step, sample_ids)
        self._metrics[mode]["time/rollout"].append(time.perf_counter() - t0)
        self._pending_rollout = ro
        prompt_ids = [ids[m].tolist() for ids, m in zip(ro.prompt_ids, ro.prompt_mask)]
        completion_ids = ro.completion_ids.tolist()  # every sampled token: the loss counts them all
        completions = self.policy.texts(ro)  # up to the first EOS: what the rewards see
        self._reward_ids = [ids[m].tolist() for ids, m in zip(ro.completion_ids, ro.text_mask)]
        # TRL's completion metrics, on the text the reward sees
        dev = self.accelerator.device
        text_len = self.accelerator.gather(ro.text_mask.sum(1).to(dev))
        truncated = self.accelerator.gather(self._truncated(ro).to(dev))
        m = self._metrics[mode]
        if mode == "train":
            self.state.num_input_tokens_seen += int(self.accelerator.gather(torch.tensor(sum(map(len, prompt_ids)) + ro.completion_ids.numel(), device=dev)).sum())
        m["num_tokens"] = [self.state.num_input_tokens_seen]
        m["completions/mean_length"].append(text_len.float().mean().item())
        m["completions/min_length"].append(text_len.float().min().item())
        m["completions/max_length"].append(text_len.float().max().item())
        m["completions/clipped_ratio"].append(truncated.float().mean().item())
        term = text_len[~truncated].float() if (~truncated).any() else torch.zeros(1, device=dev)
        m["completions/mean_terminated_length"].append(term.mean().item())
        m["completions/min_terminated_length"].append(term.min().item())
        m["completions/max_terminated_length"].append(term.max().item())
        return prompt_ids, completion_ids, None, completions, ro.logp_model.tolist(), {}, None, []

    def _truncated(self, ro: Rollout) -> torch.Tensor:
        """``[B]`` bool: no EOS among the rollout's tokens."""
        eos = self.processing_class.eos_token_id
        if eos is None:
            return torch.ones(ro.batch_size, dtype=torch.bool)
        return ~(ro.completion_ids == eos).any(1).cpu()

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # reward functions receive the ids up to the first EOS, like the text
        return super()._calculate_rewards(inputs, prompts, completions, self._reward_ids)

    def _generate_and_score_completions(self, inputs):
        mask_truncated = self.mask_truncated_completions
        self.mask_truncated_completions = False  # TRL's test looks at the last token; ours: no EOS at all
        self._generating = True
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._generating = False
            self.mask_truncated_completions = mask_truncated
        ro = self._pending_rollout.to(self.accelerator.device)
        self._pending_rollout = None
        B, N = ro.completion_ids.shape
        if out["completion_ids"].shape != (B, N):
            raise RuntimeError(f"EsoGRPOTrainer: TRL padded the completions to {tuple(out['completion_ids'].shape)}, expected {(B, N)} (pad_to_multiple_of must be None)")
        if mask_truncated:
            keep = (~self._truncated(ro)).to(out["completion_mask"].device)
            out["completion_mask"] = out["completion_mask"] * keep[:, None].to(out["completion_mask"].dtype)
            out["num_items_in_batch"] = self.accelerator.gather(out["completion_mask"].sum()).sum()
        out[_ORDER], out[_STEPS], out[_IDS], out[_SAMPLER] = ro.order, ro.steps, ro.sample_ids.to(ro.order.device), ro.logp_model
        out[_SIZES] = ro.step_sizes[None].expand(B, -1).clone()  # per sample, so that TRL's split keeps it
        mode = "train" if self.model.training else "eval"
        t0 = time.perf_counter()
        self._score_old_and_ref(out, ro, mode)
        self._metrics[mode]["time/score"].append(time.perf_counter() - t0)
        if self.args.log_exact_kl and mode == "train":
            # an exact-likelihood loss with a KL has just scored the reference exactly: reuse it
            known = out[_REF][:, 0] if _REF in out and self.estimator_cfg.info().equals_sampler else None
            self._log_exact_kl(ro, known)
        if self.args.objective == "wd1":
            from .objectives import wd1_weights

            adv = self.accelerator.gather(out["advantages"])
            w = wd1_weights(adv, self.num_generations if mode == "train" else self.num_generations_eval, self.args.wd1_psi)
            r = self.accelerator.process_index
            out[_WD1] = w[r * B : (r + 1) * B]
        self._metrics[mode]["memory/peak_mb"].append(peak_memory_mb(self.accelerator.device))
        return out

    @torch.no_grad()
    def _score_old_and_ref(self, out: dict, ro: Rollout, mode: str) -> None:
        """Old and reference log-probs ``[B, μ, N]`` (one slice per inner iteration) under the
        estimator, before any update. TRL left placeholders (or nothing) for them."""
        est = self.estimator_cfg
        info = est.info()
        deterministic = info.deterministic
        if self.args.objective in ("spg", "wd1"):
            # ratio-free objectives without a KL read neither old nor reference log-probs
            out.pop("old_per_token_logps", None)
            out.pop("ref_per_token_logps", None)
            return
        mu = self.num_iterations if mode == "train" else 1
        gen = self._generation_step() if mode == "train" else -1
        seeds = [self.estimator_seed(gen, it) for it in range(mu)]
        need_old = "old_per_token_logps" in out
        out.pop("old_per_token_logps", None)
        out.pop("ref_per_token_logps", None)
        if info.equals_sampler:  # exact (and replay): the sampler's log-probs, no forward
            out["old_per_token_logps"] = ro.logp_model.to(out["completion_ids"].device).float()
        elif need_old:
            lps = [self._score(self.policy, ro, s)[0] for s in (seeds[:1] if deterministic else seeds)]
            out[_OLD] = torch.stack(lps, 1).expand(-1, mu, -1).clone() if deterministic else torch.stack(lps, 1)
        if self.beta != 0.0:
            with self._reference() as ref_policy:
                lps = [self._score(ref_policy, ro, s)[0] for s in (seeds[:1] if deterministic else seeds)]
            out[_REF] = torch.stack(lps, 1).expand(-1, mu, -1).clone() if deterministic else torch.stack(lps, 1)

    @torch.no_grad()
    def _log_exact_kl(self, ro: Rollout, ref: torch.Tensor | None = None) -> None:
        """``exact_kl``: ``E_y [log π(y, τ) − log π_ref(y, τ)] / N`` over the generation batch
        (nats per completion token), both terms the *exact* trajectory log-likelihoods
        (docs/ESOLM.md §4): the policy's are the sampler's recorded ones, the reference's one
        forward. An unbiased estimate of the trajectory KL per token (k1: a batch value can be
        negative), identical in meaning for every estimator the loss uses. ``ref``: the
        reference's exact log-probs ``[B, N]`` when already scored (no second forward)."""
        if ref is not None:
            self._exact_kl_from(ro, ref.to(ro.logp_model.device))
            return
        if self._kl_ref_model is not None:
            if next(self._kl_ref_model.parameters()).device != self.accelerator.device:
                self._kl_ref_model.to(self.accelerator.device)
            ref_policy = EsoPolicy(self._kl_ref_model, self.processing_class, self.args.sampling(), self.accelerator, self.args.attention_backend)
            ctx = contextlib.nullcontext(ref_policy)
        else:
            ctx = self._reference()
        mb = self.args.per_device_train_batch_size
        with ctx as ref_policy:
            ref = torch.cat([ref_policy.log_probs(ro.index(torch.arange(i, min(i + mb, ro.batch_size), device=ro.order.device)), "exact")[0]
                             for i in range(0, ro.batch_size, mb)])
        self._exact_kl_from(ro, ref)

    def _exact_kl_from(self, ro: Rollout, ref: torch.Tensor) -> None:
        valid = ro.completion_mask.to(ref.dtype)
        diff = ((ro.logp_model.to(ref.dtype) - ref) * valid).sum()
        tot = self.accelerator.gather(torch.stack([diff, valid.sum()]).float()[None]).sum(0)
        self._metrics["train"]["exact_kl"].append((tot[0] / tot[1].clamp(min=1)).item())

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: TRL's ``ref_model``, or (PEFT) the policy with its adapters
        disabled, as TRL does."""
        if self.ref_model is not None:
            yield EsoPolicy(self.ref_model, self.processing_class, self.args.sampling(), self.accelerator, self.args.attention_backend)
            return
        from trl.trainer.utils import use_adapter

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in getattr(model, "peft_config", {}) else None):
            yield self.policy

    def _score(self, policy: EsoPolicy, ro: Rollout, seed: int, entropy: bool = False):
        """Per-token log-probs ``[B, N]`` (and entropies) of ``ro`` under the estimator, chunked
        by ``per_device_train_batch_size``."""
        est = self.estimator_cfg
        params = est.params(self.args.sampling_alpha0, seed)
        mb = self.args.per_device_train_batch_size
        lps, ents = [], []
        for i in range(0, ro.batch_size, mb):
            sub = ro.index(torch.arange(i, min(i + mb, ro.batch_size), device=ro.order.device))
            lp, _, ent = policy.log_probs(sub, est.likelihood, with_entropy=True, **params) if entropy else (*policy.log_probs(sub, est.likelihood, **params), None)
            lps.append(lp)
            ents.append(ent)
        return torch.cat(lps), (torch.cat(ents) if entropy else None)

    # ------------------------------------------------------------------ batches outside training
    def rows_for(self, step: int) -> list[dict]:
        """The rows of one generation batch drawn with ``step`` as seed (each prompt repeated
        ``num_generations`` times, as TRL's sampler does): for diagnostics outside ``train``."""
        ds = self.train_dataset
        k = self.args.generation_batch_size // self.num_generations
        perm = torch.randperm(len(ds), generator=make_generator(self.args.seed, Stream.DIAG_ROWS, step))[:k]
        return [dict(ds[int(i)]) for i in perm for _ in range(self.num_generations)]

    @torch.no_grad()
    def sample_batch(self, rows: list[dict], gen_step: int) -> dict:
        """Generate and score ``rows`` exactly as training would at ``global_step = gen_step``
        (same rollout noise, rewards and advantages), without touching the run's state or
        metrics. Returns ``{"rollout": Rollout, "advantages": [B], "inputs": TRL's batch}``."""
        saved_step, was_training = self.state.global_step, self.model.training
        saved_metrics = {k: list(v) for k, v in self._metrics["train"].items()}
        self.state.global_step = gen_step
        self.model.train()
        try:
            out = self._generate_and_score_completions(rows)
        finally:
            self.state.global_step = saved_step
            self.model.train(was_training)
            self._metrics["train"].clear()
            self._metrics["train"].update(saved_metrics)
        return {"rollout": self._micro_batch_rollout(out), "advantages": out["advantages"], "inputs": out}

    # ------------------------------------------------------------------ the loss
    def _micro_batch_rollout(self, inputs: dict) -> Rollout:
        """The micro-batch's :class:`Rollout` rebuilt from TRL's (split, shuffled) inputs."""
        cids = inputs["completion_ids"]
        s = self.args.sampling()
        return Rollout(prompt_ids=inputs["prompt_ids"], prompt_mask=inputs["prompt_mask"].bool(), completion_ids=cids, order=inputs[_ORDER],
                       step_sizes=inputs[_SIZES][0], steps=inputs[_STEPS], completion_mask=torch.ones_like(cids, dtype=torch.bool),
                       text_mask=first_eos_mask(cids, self.processing_class.eos_token_id), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       sample_ids=inputs[_IDS], logp_model=inputs.get(_SAMPLER))

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        it = self._iteration() if mode == "train" else 0
        inputs = dict(inputs)
        for key, trl_key in ((_OLD, "old_per_token_logps"), (_REF, "ref_per_token_logps")):
            if key in inputs:
                inputs[trl_key] = inputs[key][:, it]
        self._micro_rollout = self._micro_batch_rollout(inputs)
        self._micro_inputs = inputs
        self._micro_seed = self.estimator_seed(self._generation_step() if mode == "train" else -1, it)
        try:
            if self.args.objective != "grpo":
                return self._objective_loss(model, inputs, mode)
            return super()._compute_loss(model, inputs)
        finally:
            self._micro_rollout = self._micro_inputs = None

    def _objective_loss(self, model, inputs: dict, mode: str):
        """The loss of ``objective`` espo / spg / wd1 on the micro-batch (:mod:`esorl.rl.objectives`),
        scaled for gradient accumulation as TRL's losses are."""
        from ..likelihood import sandwich_bounds
        from .objectives import espo_loss, spg_loss, wd1_loss

        a = self.args
        ro = self._micro_rollout
        policy = self.policy if model is self.model else EsoPolicy(model, self.processing_class, a.sampling(), self.accelerator, a.attention_backend)
        adv = inputs["advantages"]
        valid = ro.completion_mask
        if a.objective == "spg":
            with policy.autocast():
                lower, upper = sandwich_bounds(policy.model, ro, n=a.mc_samples, eubo_beta=a.spg_eubo_beta, seed=self._micro_seed, backend=policy.backend)
            loss, stats = spg_loss(lower.float(), upper.float(), adv, valid.sum(1), a.spg_mix_weight)
        else:
            lp = self._score(policy, ro, self._micro_seed)[0].float()
            seq = (lp * valid).sum(1)
            if a.objective == "wd1":
                loss, stats = wd1_loss(seq, inputs[_WD1], self.num_generations if mode == "train" else self.num_generations_eval)
            else:  # espo
                def seq_of(key):
                    v = inputs.get(key)
                    return (v.float() * valid).sum(1) if isinstance(v, torch.Tensor) else None

                old = seq_of("old_per_token_logps")
                loss, stats = espo_loss(seq, seq.detach() if old is None else old, seq_of("ref_per_token_logps"), adv, ro.num_new,
                                        a.epsilon, a.epsilon_high if a.epsilon_high is not None else a.epsilon, self.beta)
        for k, v in stats.items():
            self._metrics[mode][f"{a.objective}/{k}"].append(v)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss / normalizer

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs):
        """The estimator's per-token log-probs ``[B, N]`` and entropies ``[B, N]`` of the
        current micro-batch (TRL's signature; the rollout comes from ``_compute_loss``)."""
        if self._generating:
            # TRL's own old/reference scoring during generation: answered by
            # _score_old_and_ref once the rollout tensors are attached (no forward here)
            B = input_ids.shape[0]
            return torch.zeros(B, logits_to_keep, device=input_ids.device), None, None
        ro = self._micro_rollout
        if ro is None:
            raise RuntimeError("EsoGRPOTrainer: log-probs requested outside a loss computation")
        if input_ids.shape[1] - ro.prompt_ids.shape[1] != ro.num_new:
            raise RuntimeError("EsoGRPOTrainer: the micro-batch's ids and its rollout disagree")
        policy = self.policy if model is self.model else EsoPolicy(model, self.processing_class, self.args.sampling(), self.accelerator, self.args.attention_backend)
        lp, ent = self._score(policy, ro, self._micro_seed, entropy=True)
        # TRL exponentiates log π − log π_old and log π_ref − log π unclamped; an
        # importance-weighted MC estimate (mc_elbo's 1/t weights) can make either hundreds of
        # nats, whose exp overflows to inf and ends the run through non-finite gradients.
        # Bounding the *targets* to ±LOG_RATIO_CLAMP around the current values keeps every
        # ratio within e^±20 (exact's log-ratios stay far inside, so exact runs never see it).
        inputs, cur = self._micro_inputs, lp.detach()
        for key in ("old_per_token_logps", "ref_per_token_logps"):
            if inputs is not None and isinstance(inputs.get(key), torch.Tensor):
                inputs[key] = torch.maximum(torch.minimum(inputs[key], cur + LOG_RATIO_CLAMP), cur - LOG_RATIO_CLAMP)
        return lp, (ent if compute_entropy else None), None

    # ------------------------------------------------------------------ checkpoints and resume
    # settings a resumed run cannot change: what they key, and why
    FIXED_ON_RESUME = {"seed": "rollouts, prompt order and estimator noise are keyed by it",
                       "generation_batch_size": "the data position of a resumed run counts generation batches",
                       "num_generations": "the data position of a resumed run counts prompt groups"}

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; a resume first checks that the checkpoint's run can be continued
        with the current settings (:meth:`check_resume`), and then follows the current
        learning rate, schedule length and AdamW settings (``_load_optimizer_and_scheduler``)."""
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
            if path:
                self.check_resume(path, self.args)
                import json
                from pathlib import Path

                st = Path(path) / "trainer_state.json"
                step = json.loads(st.read_text()).get("global_step", 0) if st.exists() else 0
                if step % self._updates_per_generation():
                    # TRL does not checkpoint its buffered generation batch: a resume between two
                    # updates of one batch samples it again with the updated weights
                    warnings.warn(f"resuming from {path} at step {step}, inside a generation batch ({self._updates_per_generation()} updates each): "
                                  "the rest of that batch is sampled again, so the resumed run differs from an uninterrupted one. "
                                  "Checkpoints at multiples of that number resume exactly.", stacklevel=2)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @classmethod
    def check_resume(cls, checkpoint, args: "EsoGRPOConfig") -> None:
        """Raise :class:`~esorl.train.common.CheckpointError` naming the setting if ``args``
        changes one of :attr:`FIXED_ON_RESUME` against the run that wrote ``checkpoint``."""
        import json
        from pathlib import Path

        from ..train.common import CheckpointError

        f = Path(checkpoint) / _RUN_FILE
        if not f.exists():
            return  # a checkpoint of plain TRL: nothing recorded
        saved = json.loads(f.read_text())
        bad = [f"grpo.{k} {saved[k]!r} → {getattr(args, k)!r} ({why})" for k, why in cls.FIXED_ON_RESUME.items() if k in saved and saved[k] != getattr(args, k)]
        if bad:
            raise CheckpointError(f"cannot resume {checkpoint} with changed settings: {'; '.join(bad)}. Start a new run (another output_dir) "
                                  "or restore these settings.")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            import json
            import os

            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            d = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            rec = {k: getattr(self.args, k) for k in self.FIXED_ON_RESUME} | {"likelihood": self.args.likelihood, "skipped_updates": self.nonfinite.skipped_updates}
            with open(os.path.join(d, _RUN_FILE), "w") as fh:
                json.dump(rec, fh, indent=1)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        # a resumed run follows the current settings: the checkpoint's optimizer state carries the
        # old AdamW hyper-parameters and its scheduler the old peak LR (its length comes from the
        # current max_steps already: LambdaLR does not save its lambda)
        a = self.args
        for i, g in enumerate(self.optimizer.param_groups):
            if "betas" in g:
                g["betas"], g["eps"] = (a.adam_beta1, a.adam_beta2), a.adam_epsilon
            if i == 0:  # Trainer's first group holds the decayed parameters
                g["weight_decay"] = a.weight_decay
        sch = self.lr_scheduler
        if hasattr(sch, "base_lrs") and hasattr(sch, "lr_lambdas"):
            sch.base_lrs = [a.learning_rate for _ in sch.base_lrs]
            for g, lam in zip(self.optimizer.param_groups, sch.lr_lambdas):
                g["lr"] = a.learning_rate * lam(sch.last_epoch)
        import json
        from pathlib import Path

        f = Path(checkpoint) / _RUN_FILE
        if f.exists():
            self.nonfinite.skipped_updates = int(json.loads(f.read_text()).get("skipped_updates", 0))

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        # the tokenizer travels with every saved model, so a checkpoint is a loadable policy
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir or self.args.output_dir)


def config_from_dict(values: dict, prefix: str = "grpo.") -> EsoGRPOConfig:
    """An :class:`EsoGRPOConfig` from a recipe section: unknown and ill-typed fields raise
    :class:`~esorl.config.ConfigError` naming ``<prefix><field>``; TRL's and esorl's own
    checks raise ``ValueError``."""
    from ..config import from_dict

    return from_dict(EsoGRPOConfig, values, prefix=prefix)


__all__ = ["EsoGRPOConfig", "EsoGRPOTrainer", "config_from_dict"]
