"""The DeepSpeed engine a train worker drives, and one optimizer step on it: the train job's
workers, `benchmarks/train_step.py` and the tests build and step it here, so the three measure
and check the same thing.

ZeRO stage 2 over the trainable parameters (LoRA, prompter, decoder), torch AdamW as the client
optimizer (ZeRO partitions its state), and the warm-up + cosine learning-rate schedule.
"""

from __future__ import annotations

import math

import torch

from rsrefseg.inference.scoring import model_inputs
from rsrefseg.platform.config import TrainConfig


def choose_precision(train: TrainConfig) -> str:
    if train.precision != "auto":
        return train.precision
    if train.use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cast_for_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Cast the whole module, buffers included, to the engine's half precision (in place).

    DeepSpeed's bf16/fp16 modes cast the parameters only; float32 buffers (SAM's positional-
    encoding matrix, the prompter's BatchNorm statistics) then meet half-precision weights in one
    op and the first forward fails. fp32 leaves the model as it is."""
    dtype = HALF_DTYPES.get(precision)
    return model if dtype is None else model.to(dtype)


def deepspeed_config(train: TrainConfig, world_size: int, precision: str) -> dict:
    """ZeRO stage 2 over the trainable parameters; the optimizer is ours (torch AdamW)."""
    zero = {
        "stage": train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": bool(train.use_gpu),
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if train.grad_clip == 0 and train.zero_stage in (1, 2):
        # Nothing reads the norm: skip its per-tensor reductions (measured on an H100, README).
        zero["compute_grad_norm"] = False
    bf16 = {"enabled": precision == "bf16"}
    if not train.skip_nonfinite_steps:
        bf16["check_grad_overflow"] = False
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # torch.optim.AdamW is a client optimizer; ZeRO partitions its state all the same.
        "zero_allow_untested_optimizer": True,
        "bf16": bf16,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; DeepSpeed takes it as a client optimizer and ZeRO
    partitions its state (the fused kernel runs on each rank's flat partition)."""
    return torch.optim.AdamW(params, lr=train.lr, betas=(0.9, train.adam_beta2), weight_decay=train.weight_decay,
                             fused=train.fused_adamw)


def warmup_cosine(
    total_steps: int, warmup_steps: int, *, start_factor: float = 0.0, min_factor: float = 0.0,
    steps_per_epoch: int = 0, cosine_start: int = 0, cosine_steps: int = 0,
):
    """LambdaLR factor: linear warm-up from `start_factor` to the base lr, flat until
    `cosine_start` (a step; the warm-up's end if earlier), then cosine decay towards `min_factor`
    over `cosine_steps` (T_max; 0 = to `total_steps`, which it then reaches). With
    `steps_per_epoch`, the cosine moves once per epoch (the authors' recipe: per-epoch cosine
    after a per-step warm-up); without, every step."""
    start = max(warmup_steps, cosine_start)
    period = cosine_steps or max(1, total_steps - start)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return start_factor + (1.0 - start_factor) * (step + 1) / warmup_steps
        at = (step // steps_per_epoch) * steps_per_epoch if steps_per_epoch else step
        progress = max(0.0, (at - start) / period)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def lr_schedule(train: TrainConfig, steps_per_epoch: int):
    """The LambdaLR factor of a resolved train config."""
    return warmup_cosine(
        steps_per_epoch * train.epochs,
        int(round(train.warmup_epochs * steps_per_epoch)),
        start_factor=train.warmup_start_factor,
        min_factor=train.min_lr_factor,
        steps_per_epoch=steps_per_epoch if train.cosine_per == "epoch" else 0,
        cosine_start=int(round((train.cosine_start or 0.0) * train.epochs * steps_per_epoch)),
        cosine_steps=int(round(train.cosine_length * train.epochs * steps_per_epoch)),
    )


def build_engine(model: torch.nn.Module, train: TrainConfig, *, world_size: int, steps_per_epoch: int,
                 precision: str | None = None):
    """(engine, lr scheduler, precision): `model` cast to the precision, its trainable parameters
    under DeepSpeed ZeRO with the train config's optimizer and schedule. Needs a process group
    (Ray Train's, or one of a single process for a benchmark or a test)."""
    import deepspeed

    from rsrefseg.training.native_ops import use_venv_tools

    use_venv_tools()  # the ninja DeepSpeed builds its CPU op with: see native_ops
    precision = precision or choose_precision(train)
    model = cast_for_precision(model, precision)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(train, steps_per_epoch))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, world_size, precision),
        dist_init_required=False,  # Ray Train (or the caller) already set up the process group
    )
    return engine, scheduler, precision


def train_step(engine, batch: dict, terms: dict | None = None) -> torch.Tensor:
    """One optimizer step on a batch already on the engine's device; the loss, detached (no host
    sync: the caller decides when to read it). `terms`: a dict to which each weighted loss term
    (bce, dice, and RSRefSeg-2's decorrelation and contrastive) is added, detached, by name."""
    logits, aux = engine(**model_inputs(batch), return_aux=True)
    parts = engine.module.loss_terms(logits.float(), batch["mask"], aux)
    loss = sum(parts.values())
    engine.backward(loss)
    engine.step()
    if terms is not None:
        for name, value in parts.items():
            terms[name] = terms.get(name, 0) + value.detach()
    return loss.detach()
