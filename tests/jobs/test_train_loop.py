"""Pieces of the train worker's loop that need no Ray: optimizer, schedule, DeepSpeed config."""

from __future__ import annotations

import math

import torch

from rsrefseg.jobs.train_loop import build_optimizer, deepspeed_config, warmup_cosine
from rsrefseg.models.rsrefseg import build_model
from tests.models.helpers import forward, make_batch, tiny_config


def test_fused_adamw_trains_like_the_plain_one():
    batch = make_batch(2)
    params = {}
    for fused in (True, False):
        cfg = tiny_config([f"train.fused_adamw={str(fused).lower()}", "train.lr=0.01"])
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


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == 0.1 and f(9) == 1.0
    assert math.isclose(f(55), 0.5, abs_tol=1e-9)  # half way through the decay
    assert f(100) == 0.0 and f(1000) == 0.0


def test_deepspeed_config_is_zero2_with_the_precision_asked():
    train = tiny_config(["train.batch_size=8", "train.num_workers=2"]).train
    ds = deepspeed_config(train, world_size=2, precision="bf16")
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert not deepspeed_config(train, 2, "fp32")["bf16"]["enabled"]
