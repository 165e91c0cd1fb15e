"""Pieces of the train worker's loop that need no Ray: optimizer, schedule, DeepSpeed engine."""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rsrefseg.training.engine import (build_engine, build_optimizer, deepspeed_config,
                                      lr_schedule, train_step, warmup_cosine)
from rsrefseg.models.build import build_model
from rsrefseg.training.native_ops import use_venv_tools
from tests.conftest import single_process_group
from tests.models.helpers import forward, make_batch, tiny_config


def test_fused_adamw_trains_like_the_plain_one():
    batch = make_batch(2)
    params = {}
    for fused in (True, False):
        cfg = tiny_config([f"train.fused_adamw={str(fused).lower()}", "train.lr=0.01"]).resolved()
        model = build_model(cfg.model)
        opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
        assert opt.defaults["fused"] is fused
        for _ in range(3):
            model.loss(forward(model, batch), batch["mask"]).backward()
            opt.step()
            opt.zero_grad()
        params[fused] = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    start = build_model(tiny_config().model).trainable_state_dict()
    moved = [k for k in start if not torch.equal(start[k], params[True][k])]
    assert moved  # the steps did change the weights
    for k in params[True]:
        torch.testing.assert_close(params[True][k], params[False][k], rtol=1e-3, atol=1e-4)


def test_adam_beta2_bounds_the_step_of_a_sudden_large_gradient():
    # After many small gradients, a 100x larger one: with beta2 0.999 the second moment still
    # remembers the small ones and the weight jumps by several lr; with 0.95 it has moved on.
    jumps = {}
    for beta2 in (0.999, 0.95):
        train = tiny_config([f"train.adam_beta2={beta2}", "train.lr=0.01", "train.weight_decay=0"]).resolved().train
        weight = torch.nn.Parameter(torch.zeros(1))
        opt = build_optimizer([weight], train)
        assert opt.defaults["betas"] == (0.9, beta2)
        for step in range(2001):
            weight.grad = torch.full((1,), 100.0 if step == 2000 else 1.0 * (-1) ** step)
            before = weight.detach().clone()
            opt.step()
        jumps[beta2] = abs(float(weight.detach() - before)) / train.lr
    assert jumps[0.999] > 2.5 and jumps[0.95] < 1.0, jumps


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == 0.1 and f(9) == 1.0
    assert math.isclose(f(55), 0.5, abs_tol=1e-9)  # half way through the decay
    assert f(100) == 0.0 and f(1000) == 0.0


def test_a_flat_stretch_before_the_cosine_and_a_longer_period():
    # RSRefSeg-2's recipe: warm-up over 2 of 20 epochs, flat until 10 %... here 25 % (epoch 5),
    # then the cosine to the min at the last epoch; with a period of 2 x epochs it stops half way.
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_factor=0.01, cosine_start=25)
    assert f(9) == 1.0 and f(10) == f(24) == 1.0 and f(26) < 1.0
    assert math.isclose(f(100), 0.01)
    cut = warmup_cosine(total_steps=100, warmup_steps=10, min_factor=0.0, cosine_start=25, cosine_steps=150)
    assert math.isclose(cut(100), 0.5 * (1 + math.cos(math.pi * 75 / 150)))
    resolved = tiny_config(["model.arch=rsrefseg2", "train.epochs=20", "train.warmup_epochs=1"]).resolved().train
    schedule = lr_schedule(resolved, steps_per_epoch=5)
    assert schedule(5) == schedule(14) == 1.0 and schedule(15) < 1.0  # the cosine starts at epoch 2 (10 % of 20)


def test_the_variants_schedules():
    # paper: warm-up from nothing, cosine every step down to zero.
    paper = lr_schedule(tiny_config(["train.epochs=10", "train.warmup_epochs=2"]).resolved().train, steps_per_epoch=5)
    assert paper(0) == 0.1 and paper(9) == 1.0 and paper(49) < 0.01
    assert paper(20) != paper(21)  # moves every step
    # official (the authors' code): warm-up from 0.01 x lr, then a per-epoch cosine down to 0.001 x lr.
    official = lr_schedule(
        tiny_config(["model.variant=official", "train.epochs=10", "train.warmup_epochs=2"]).resolved().train,
        steps_per_epoch=5,
    )
    assert math.isclose(official(0), 0.01 + 0.99 / 10) and official(9) == 1.0
    assert official(10) == official(14) == 1.0 and official(15) == official(19) < 1.0  # steps once per epoch
    assert math.isclose(official(10**6), 0.001)
    assert all(official(s) > official(s + 5) for s in range(10, 45, 5))  # decays epoch by epoch


def test_deepspeed_config_is_zero2_with_the_precision_asked():
    train = tiny_config(["train.batch_size=8", "train.num_workers=2", "train.grad_clip=1",
                         "train.skip_nonfinite_steps=true"]).train
    ds = deepspeed_config(train, world_size=2, precision="bf16")
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert not deepspeed_config(train, 2, "fp32")["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 1.0 and "compute_grad_norm" not in ds["zero_optimization"]
    assert "check_grad_overflow" not in ds["bf16"]  # DeepSpeed's default: check


def test_defaults_skip_the_norm_and_the_nonfinite_checks():
    train = tiny_config().train  # the authors' recipe: no clipping; plain bf16 steps
    ds = deepspeed_config(train, world_size=1, precision="bf16")
    assert ds["gradient_clipping"] == 0 and ds["zero_optimization"]["compute_grad_norm"] is False
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}


def test_deepspeed_builds_its_cpu_op_with_the_ninja_beside_this_python(monkeypatch):
    # Not the system's: two ninjas disagree about the build log, and each switch recompiles.
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]))
    use_venv_tools()
    assert shutil.which("ninja") == os.path.join(bindir, "ninja")
    use_venv_tools()
    assert os.environ["PATH"].split(os.pathsep).count(bindir) == 1


@pytest.fixture(scope="module")
def one_process_group():
    """The single-process gloo group a Ray Train worker would have; DeepSpeed needs one, and
    caches the first it sees, so all engines of this module share it."""
    with single_process_group():
        yield


def _deepspeed_steps(overrides: list[str], batch: dict, steps: int = 2, precision: str = "fp32",
                     watch: list | None = None):
    """The train worker's engine (build_engine: its optimizer, schedule and ZeRO-2 config), a few
    of its steps (train_step), the weights. `watch`: gets, per forward of SAM's first block,
    whether it ran under torch.compile."""
    cfg = tiny_config(["train.batch_size=2", "train.lr=0.01", *overrides]).resolved()
    model = build_model(cfg.model)
    if watch is not None:
        model.sam.image_encoder.blocks[0].register_forward_hook(
            lambda *_: watch.append(torch.compiler.is_compiling()))
    engine, _, used = build_engine(model, cfg.train, world_size=1, steps_per_epoch=steps, precision=precision)
    assert used == precision
    for _ in range(steps):
        loss = train_step(engine, batch)
        assert loss.requires_grad is False and torch.isfinite(loss)
    return engine.module


@pytest.mark.slow
def test_speed_switches_train_under_deepspeed_like_the_plain_path(one_process_group, monkeypatch):
    # channels-last used to break deepspeed.initialize (its broadcast views parameters as bytes);
    # compile and checkpointing must also pass through ZeRO-2's gradient hooks.
    # Also the test of torch.compile itself: the towers are compiled in place, dynamo captures
    # them and AOTAutograd traces their backward (the parts that meet LoRA, checkpointing and
    # ZeRO-2's hooks), and the weights after two steps match the eager path's. Code generation is
    # left to the "aot_eager" backend here: Inductor's C++ kernels for three towers cost over two
    # minutes of 2 cores with a cold cache, as CI has. `benchmarks/train_step.py --variant
    # model.compile_backbones=true` runs the switch as users get it (Inductor).
    aot_eager = functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")
    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    batch = make_batch(2)
    plain = _deepspeed_steps(["model.channels_last=false", "model.compile_backbones=false"], batch)
    compiling: list[bool] = []
    fast = _deepspeed_steps(["model.channels_last=true", "model.compile_backbones=true",
                             "model.activation_checkpointing=true"], batch, watch=compiling)
    towers = [fast.sam.image_encoder, fast.siglip.model.vision_model, fast.siglip.model.text_model]
    assert all(t._compiled_call_impl is not None for t in towers)
    assert plain.sam.image_encoder._compiled_call_impl is None
    assert any(compiling)  # SAM's first block ran under dynamo (a checkpointed recompute may not)
    # Compiled in place: checkpoints of a compiled model load into an eager one and back.
    assert fast.trainable_state_dict().keys() == plain.trainable_state_dict().keys()
    patch_embed = fast.sam.image_encoder.patch_embed.proj.weight
    assert patch_embed.is_contiguous(memory_format=torch.channels_last) and not patch_embed.is_contiguous()
    start = build_model(tiny_config().model).trainable_state_dict()
    after_plain, after_fast = plain.trainable_state_dict(), fast.trainable_state_dict()
    assert any(not torch.equal(start[k], after_fast[k]) for k in start)  # the engine did update
    for k in after_plain:
        torch.testing.assert_close(after_fast[k], after_plain[k], rtol=1e-3, atol=1e-4, msg=k)


def test_bf16_engine_trains_every_module_in_one_dtype(one_process_group):
    # GPU training runs DeepSpeed bf16: it casts the parameters, not every buffer, so a float32
    # buffer (SAM's positional-encoding matrix, BatchNorm statistics) must not leak float32
    # activations into bf16 matmuls. DeepSpeed's CPU accelerator runs the same bf16 path.
    batch = make_batch(2)
    start = build_model(tiny_config().model).trainable_state_dict()
    # One process group for both engines: DeepSpeed caches the group it first saw.
    for switches in (["model.fold_rel_pos=false", "train.grad_clip=1", "train.skip_nonfinite_steps=true"],
                     ["model.activation_checkpointing=true"]):
        model = _deepspeed_steps(switches, batch, precision="bf16")
        after = model.trainable_state_dict()
        assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.bfloat16}
        assert any(not torch.equal(start[k].to(after[k].dtype), after[k]) for k in start)
        with torch.no_grad():
            logits = forward(model, batch)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
