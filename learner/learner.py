"""One learner rank: a DeepSpeed engine around the policy, the frozen reference, the loss.

:class:`Learner` is a plain class (``embr_rl.run`` and :mod:`embr_rl.learner_group` wrap it for
Ray). It needs ``torch.distributed`` to be initialised (see :func:`init_distributed`; a
single rank initialises a one-process group by itself).

- Engine: ZeRO stage 0-3 from ``learner.zero_stage``, a torch ``AdamW`` (no DeepSpeed op is
  compiled), gradient accumulation ``batch_size / (micro_batch_size * ranks)``, clipping at
  ``max_grad_norm``, warm-up then constant / linear / cosine decay (:func:`lr_factor`), bf16
  on GPU (``precision=auto``).
- Reference: a frozen copy of the initial policy, or, with ``model.lora.enabled``, the same
  network with the peft adapter disabled (no second copy).
- ``embr_e``: the :class:`~embr_rl.core.models.EnergyHead` sits in the engine next to the policy,
  so it is optimised, clipped and checkpointed with it.
- Mask draws are seeded from ``(seed, step, global micro-batch index)``: the same global
  batch gives the same masks on one rank or on K, and a resumed run draws what an
  uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import Tensor, nn

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed

from embr_rl.core.config import (
    AlgoConfig,
    Config,
    LearnerConfig,
    LoraConfig,
    check_batch_shape,
)
from embr_rl.core.experience import PairBatch
from embr_rl.core.losses import LossBatch, LossModels, LossOutput, get_loss, traits_of
from embr_rl.core.models.lora import wrap_lora
from embr_rl.core.transport import (
    Manifest,
    SyncStats,
    TensorSpec,
    TransportSpec,
    WeightBroadcast,
    build_manifest,
    free_port,
    get_broadcast,
)
from learner.batching import TokenIds, split_batch, to_loss_batch

__all__ = [
    "Learner",
    "PolicySpec",
    "free_port",
    "init_distributed",
    "lr_factor",
    "shutdown_distributed",
]


@dataclass
class PolicySpec:
    """The network to train and the token ids the learner needs (``stop_ids``: the ids
    besides ``eos_id`` that end ``likelihood_span='until_eos'``, e.g. ``<|eot_id|>``)."""

    model: nn.Module
    mask_id: int
    pad_id: int = 0
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()


def init_distributed(
    rank: int = 0,
    world_size: int = 1,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend: str = "auto",
) -> None:
    """Initialise the default process group for DeepSpeed (gloo on CPU, NCCL on GPU)."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.update(
        MASTER_ADDR=host,
        MASTER_PORT=str(port or free_port()),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
    )
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 40 s op build
    deepspeed.init_distributed(backend, dist_init_required=True)


def shutdown_distributed() -> None:
    """Destroy the default process group so a later :func:`init_distributed` starts clean.

    DeepSpeed's own ``destroy_process_group`` also drops the groups it cached (a clone of
    the world group among them; a stale one would break the next engine)."""
    from deepspeed.comm import comm as ds_comm

    if not dist.is_initialized():
        return
    if ds_comm.cdb is None:  # initialised without DeepSpeed
        dist.destroy_process_group()
    else:
        ds_comm.destroy_process_group()


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based): linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def seeded_energy_head(hidden_size: int, hidden: int, seed: int) -> nn.Module:
    """EMBR-E's ``c_phi`` initialised from ``seed`` alone, on every rank and in every process;
    the global generator is left as it was. (Drawn from the global generator, its first layer
    differed with whatever ran before it: two EMBR-E runs of one seed did not agree.)"""
    from embr_rl.core.models import EnergyHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([seed, 0xE7]).generate_state(1)[0]))
        return EnergyHead(hidden_size, hidden)


class _Trainable(nn.Module):
    """What the engine owns: the policy and, for EMBR-E, the energy head."""

    def __init__(self, policy: nn.Module, energy_head: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.energy_head = energy_head
        self.metrics: dict[str, float] = {}

    def forward(self, compute: Callable[[], LossOutput]) -> Tensor:
        """Run one loss under the engine's forward (ZeRO needs its forward/backward hooks)."""
        out = compute()
        self.metrics = out.metrics
        return out.loss


class _AdapterDisabled(nn.Module):
    """The LoRA model's base: forwards with the peft adapter switched off, never trained."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_peft", peft_model)  # not a submodule: no second registration

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft.disable_adapter():
            return self._peft(*args, **kwargs)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class Learner:
    """One rank of the learner group: ``train_step``, ``save``/``load``, weight push."""

    def __init__(
        self,
        cfg: LearnerConfig,
        algo: AlgoConfig,
        spec: PolicySpec,
        *,
        lora: LoraConfig | None = None,
        seed: int = 0,
    ) -> None:
        if not dist.is_initialized():
            init_distributed(backend=cfg.dist_backend)
        self.cfg, self.algo, self.seed = cfg, algo, seed
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        traits = traits_of(algo.name)
        check_batch_shape(cfg, self.world_size, traits.pairwise, algo.name)
        self.grad_accum = cfg.batch_size // (cfg.micro_batch_size * self.world_size)
        self.pairwise = traits.pairwise
        self.device = _device()
        self.ids = TokenIds(spec.pad_id, spec.eos_id, tuple(spec.stop_ids))
        self.loss_fn = get_loss(algo.name)
        self.lora = lora is not None and lora.enabled

        policy = spec.model.to(self.device)
        if self.lora:
            assert lora is not None
            policy = wrap_lora(policy, lora)
            reference: nn.Module = _AdapterDisabled(policy)
        else:
            reference = copy.deepcopy(policy).eval().requires_grad_(False)
        policy.train()
        head = None
        if traits.energy_head:
            head = seeded_energy_head(
                int(policy.config.hidden_size), algo.value_head_hidden, seed
            ).to(self.device)
        trainable = _Trainable(policy, head)
        params = [p for p in trainable.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=(cfg.adam_betas[0], cfg.adam_betas[1]),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        self.bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and self.device.type == "cuda"
        )
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=trainable,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=self.deepspeed_config(),
            dist_init_required=False,
        )
        if self.bf16 and not self.lora:
            reference.to(torch.bfloat16)
        module = self.engine.module
        self.models = LossModels(
            policy=module.policy,
            mask_id=spec.mask_id,
            reference=reference,
            energy_head=module.energy_head,
            generator=torch.Generator(self.device),
        )
        self.step = 0
        self._broadcast_names = [
            n for n, p in module.policy.named_parameters() if p.requires_grad or not self.lora
        ]
        self._sender: WeightBroadcast | None = None
        self._manifest: Manifest | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Learner:
        """Load ``cfg.model`` for training and build the rank (process group already set up)."""
        from embr_rl.core.models.loader import load_model

        loaded = load_model(cfg.model, for_training=True)
        spec = PolicySpec(
            loaded.model,
            loaded.mask_token_id,
            loaded.pad_token_id,
            loaded.eos_token_id,
            loaded.stop_token_ids,
        )
        return cls(cfg.learner, cfg.algo, spec, lora=cfg.model.lora, seed=cfg.seed)

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config built from ``learner.*`` (no DeepSpeed optimizer: a torch one)."""
        return {
            "train_batch_size": self.cfg.batch_size,
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.cfg.max_grad_norm,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "bf16": {"enabled": self.bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    # ----------------------------------------------------------------------- training

    @property
    def policy(self) -> nn.Module:
        return self.engine.module.policy

    def local_batch_size(self) -> int:
        """Rows this rank trains on per step (pairs: half as many pairs)."""
        return self.cfg.batch_size // self.world_size

    def sample_from(self, buffer: Any, step: int | None = None) -> pa.Table | PairBatch:
        """This rank's shard drawn from ``buffer`` (an ``ExperienceBuffer``-like object).

        The draw is seeded by ``(seed, step, rank)``, so ranks draw different rows.
        """
        seed = int(
            np.random.SeedSequence(
                [self.seed, self.step if step is None else step, self.rank]
            ).generate_state(1)[0]
        )
        n = self.local_batch_size()
        if self.pairwise:
            return buffer.sample_pairs(n // 2, generator=seed)
        return buffer.sample(n, generator=seed)

    def _mask_seed(self, micro: int) -> int:
        index = self.rank * self.grad_accum + micro
        return int(np.random.SeedSequence([self.seed, self.step, index]).generate_state(1)[0])

    def train_step(self, batch: pa.Table | PairBatch | LossBatch) -> dict[str, float]:
        """One optimiser step on this rank's share of the global batch; returns ``learner/...`` metrics."""
        data = to_loss_batch(
            batch, self.models, ids=self.ids, span=self.algo.likelihood_span, device=self.device
        )
        lr = float(self.scheduler.get_last_lr()[0])
        sums: dict[str, float] = {}
        losses = []
        norm: float | None = None
        for i, micro in enumerate(split_batch(data, self.grad_accum)):
            self.models.generator.manual_seed(self._mask_seed(i))
            loss = self.engine(partial(self.loss_fn, micro, self.algo))
            self.engine.backward(loss)
            if self.cfg.zero_stage == 0 and i == self.grad_accum - 1:
                # Stage 0 does not record the norm; gradients are all-reduced by now.
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                norm = float(torch.nn.utils.get_total_norm(grads))
            self.engine.step()
            losses.append(float(loss.detach()))
            for k, v in self.engine.module.metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        self.step += 1
        metrics = {k: v / len(losses) for k, v in sums.items()}
        if norm is None:
            got = self.engine.get_global_grad_norm()
            norm = None if got is None else float(got)
        metrics.update(
            {
                "learner/loss": sum(losses) / len(losses),
                "learner/lr": lr,
                "learner/step": float(self.step),
                "learner/rows": float(data.completion_ids.shape[0]),
            }
        )
        if norm is not None:
            metrics["learner/grad_norm"] = float(norm)
        return metrics

    # ----------------------------------------------------------------------- parameters

    def _gathered(self, params: list[Tensor]) -> Any:
        if self.cfg.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def named_buckets(
        self, names: list[str], bucket_mb: float
    ) -> Iterator[tuple[list[TensorSpec], list[Tensor] | None]]:
        """Buckets of full parameters (ZeRO-3: gathered one bucket at a time, on every rank).

        Every rank must consume the iterator (the gather is collective); rank 0 gets each
        bucket's tensors (valid until the next item), the others ``None``. Senders flatten
        or copy them where their transport needs it, so no extra copy is made here.
        """
        params = dict(self.policy.named_parameters())
        manifest = self.manifest(names, bucket_mb)
        for b, bucket in enumerate(manifest.buckets):
            members = [params[manifest.specs[i].name] for i in bucket]
            with self._gathered(members):
                tensors = [p.data for p in members] if self.rank == 0 else None
                yield manifest.bucket_specs(b), tensors

    def manifest(self, names: list[str] | None = None, bucket_mb: float | None = None) -> Manifest:
        """Names, full shapes and dtypes of the broadcast tensors (LoRA: adapter only)."""
        params = dict(self.policy.named_parameters())
        names = self._broadcast_names if names is None else names
        shapes = [
            (n, tuple(getattr(params[n], "ds_shape", params[n].shape)), params[n].dtype)
            for n in names
        ]
        return build_manifest(shapes, self.cfg.bucket_mb if bucket_mb is None else bucket_mb)

    def full_state(self) -> dict[str, Tensor]:
        """Every policy parameter, gathered, on CPU (rank 0; other ranks get ``{}``)."""
        names = [n for n, _ in self.policy.named_parameters()]
        out: dict[str, Tensor] = {}
        for specs, tensors in self.named_buckets(names, self.cfg.bucket_mb):
            if tensors is not None:
                out.update((s.name, t.cpu().clone()) for s, t in zip(specs, tensors, strict=True))
        return out

    # ----------------------------------------------------------------------- weight sync

    def open_sync(self, spec: TransportSpec) -> None:
        """Rank 0: join the weight-sync group (blocks until every worker joins)."""
        if self.rank != 0:
            return
        self._manifest = spec.manifest
        self.close_sync()
        self._sender = get_broadcast(spec.method).sender()
        self._sender.open(spec)

    def push_weights(self, version: int) -> tuple[SyncStats | None, Any]:
        """Send the current weights as ``version``; every rank must call it (ZeRO-3 gathers)."""
        buckets = (
            tensors for _, tensors in self.named_buckets(self._broadcast_names, self.cfg.bucket_mb)
        )
        if self.rank != 0:
            for _ in buckets:
                pass
            return None, None
        if self._sender is None:
            raise RuntimeError("push_weights before open_sync: no weight-sync group on rank 0")
        return self._sender.push((b for b in buckets if b is not None), version)

    def close_sync(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    # ----------------------------------------------------------------------- checkpoints

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Full training state under ``path``: DeepSpeed checkpoint, RNG per rank, HF export."""
        path = Path(path)
        self.engine.save_checkpoint(
            str(path), tag="engine", client_state={"learner_step": self.step}
        )
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, path / f"rng_rank{self.rank}.pt")
        self.export_hf(path / "hf")
        dist.barrier()
        return path

    def load(self, path: str | os.PathLike[str]) -> int:
        """Restore a :meth:`save` (same number of ranks); returns the step it resumes at."""
        path = Path(path)
        loaded, client = self.engine.load_checkpoint(str(path), tag="engine")
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        self.step = int(client["learner_step"])
        rng = torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return self.step

    def export_hf(self, path: str | os.PathLike[str]) -> Path:
        """Hugging Face safetensors of the policy (LoRA: the adapter only), written by rank 0."""
        from safetensors.torch import save_file

        path = Path(path)
        state = self.full_state()
        if self.rank != 0:
            return path
        path.mkdir(parents=True, exist_ok=True)
        if self.lora:
            adapter = {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}
            save_file(adapter, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
            self.policy.peft_config["default"].save_pretrained(str(path))
            return path
        buffers = {
            k: v.detach().cpu().clone()
            for k, v in self.policy.state_dict().items()
            if k not in state
        }
        save_file({**state, **buffers}, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = getattr(self.policy, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(str(path))
        return path

    def close(self) -> None:
        """Release the sync group and the engine (the default process group stays)."""
        self.close_sync()
        self.engine.destroy()
