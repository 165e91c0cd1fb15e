"""RSRefSeg-2's loss terms: the contrastive term gathered over workers equals the one-process
loss on the concatenated batch, padding is ignored, the V-Net Dice and the decorrelation term."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rsrefseg.models.loss import contrastive_loss, decorrelation_loss, mask_bce_loss, mask_dice_loss

WORLD, PER_RANK, DIM = 2, 3, 8


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(WORLD * PER_RANK, DIM, generator=g)
    text = torch.randn(WORLD * PER_RANK, DIM, generator=g)
    return image, text, torch.tensor([1.3]), torch.tensor([-0.4])


def _one_process():
    image, text, scale, bias = _features()
    image.requires_grad_(True), text.requires_grad_(True)
    loss = contrastive_loss(image, text, scale, bias)
    loss.backward()
    return loss.detach(), image.grad, text.grad


def _rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        image, text, scale, bias = _features()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        local_image = image[mine].clone().requires_grad_(True)
        local_text = text[mine].clone().requires_grad_(True)
        loss = contrastive_loss(local_image, local_text, scale, bias)
        loss.backward()
        out[rank] = (loss.detach(), local_image.grad, local_text.grad)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gathered_contrastive_loss_equals_the_one_process_loss_on_the_whole_batch():
    """Two gloo workers, three samples each: each worker's loss is the loss of one process on
    all six, and the gradient each worker gets on its own vectors is that loss's gradient there
    (the other workers' rows enter as constants, the local slot carries the gradient)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), out), nprocs=WORLD, join=True)
        results = dict(out)
    loss, image_grad, text_grad = _one_process()
    for rank in range(WORLD):
        rank_loss, rank_image_grad, rank_text_grad = results[rank]
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(rank_loss, loss)
        torch.testing.assert_close(rank_image_grad, image_grad[mine])
        torch.testing.assert_close(rank_text_grad, text_grad[mine])


def test_the_contrastive_loss_is_symmetric_cross_entropy_with_scale_and_bias():
    image, text, scale, bias = _features()
    logits = scale.exp() * F.normalize(image, dim=1) @ F.normalize(text, dim=1).t() + bias
    labels = torch.arange(len(image))
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(contrastive_loss(image, text, scale, bias), want)
    # Matching pairs score lower loss than shuffled ones.
    assert contrastive_loss(text, text, scale, bias) < contrastive_loss(text.flip(0), text, scale, bias)


def test_decorrelation_is_the_mean_squared_cosine_of_the_query_means():
    q1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    q2 = torch.tensor([[[0.0, 2.0], [0.0, 2.0]], [[3.0, 0.0], [3.0, 0.0]]])  # orthogonal, then parallel
    torch.testing.assert_close(decorrelation_loss(q1, q2), torch.tensor(0.5))


def test_padding_counts_for_no_mask_term_when_ignored():
    logits = torch.tensor([[[3.0, -2.0, 50.0, -50.0]]])
    labelled = torch.tensor([[[1, 0, 255, 255]]], dtype=torch.uint8)
    cropped_logits, cropped = logits[..., :2], labelled[..., :2]
    torch.testing.assert_close(mask_bce_loss(logits, labelled, ignore_index=255), mask_bce_loss(cropped_logits, cropped))
    for exponent in (1, 2):
        torch.testing.assert_close(mask_dice_loss(logits, labelled, exponent=exponent, ignore_index=255),
                                   mask_dice_loss(cropped_logits, cropped, exponent=exponent))


def test_vnet_dice_squares_the_denominator():
    logits = torch.tensor([[[0.0, 0.0]]])  # p = 0.5, 0.5
    mask = torch.tensor([[[1, 0]]], dtype=torch.uint8)
    # plain: 1 - (2*0.5 + 1) / (1.0 + 1 + 1); V-Net: 1 - (2*0.5 + 1) / (0.5 + 1 + 1)
    torch.testing.assert_close(mask_dice_loss(logits, mask), torch.tensor(1 - 2 / 3))
    torch.testing.assert_close(mask_dice_loss(logits, mask, exponent=2), torch.tensor(1 - 2 / 2.5))
