"""Metrics against hand-computed values, empty-mask policy, and order independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsrefseg.models.loss import mask_bce_loss
from rsrefseg.models.metrics import SegMetrics, per_sample_iou


def _pair(inter: int, pred_only: int, gt_only: int, side: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x4 prediction / ground truth with the given pixel counts (raster order)."""
    pred = torch.zeros(side * side, dtype=torch.bool)
    gt = torch.zeros(side * side, dtype=torch.uint8)
    pred[:inter] = True
    gt[:inter] = 1
    pred[inter : inter + pred_only] = True
    gt[inter + pred_only : inter + pred_only + gt_only] = 255  # masks also arrive as 0/255
    return pred.reshape(side, side), gt.reshape(side, side)


# (intersection, pred-only, gt-only) -> hand-computed IoU
SAMPLES = [
    ((1, 1, 0), 0.5),
    ((0, 0, 0), 1.0),  # both empty: policy value
    ((0, 0, 4), 0.0),  # prediction empty
    ((0, 1, 0), 0.0),  # ground truth empty
    ((3, 0, 0), 1.0),
    ((3, 1, 0), 0.75),
    ((13, 1, 1), 13 / 15),
    ((9, 0, 1), 0.9),  # exactly 0.9: not counted by Pr@0.9 (strictly greater)
]
# By hand: ΣI = 29, ΣU = 39; IoUs > 0.5: 1, 1, .75, .867, .9 -> 5; > 0.8: 1, 1, .867, .9 -> 4; > 0.9: 2.
EXPECTED = {
    "Pr@0.5": 62.5,
    "Pr@0.6": 62.5,
    "Pr@0.7": 62.5,
    "Pr@0.8": 50.0,
    "Pr@0.9": 25.0,
    "cIoU": 100 * 29 / 39,
    "gIoU": 100 * (0.5 + 1 + 0 + 0 + 1 + 0.75 + 13 / 15 + 0.9) / 8,
    "count": 8,
}


def _stack():
    pairs = [_pair(*counts) for counts, _ in SAMPLES]
    return torch.stack([p for p, _ in pairs]), torch.stack([g for _, g in pairs])


def test_per_sample_iou_hand_cases():
    pred, gt = _stack()
    expected = torch.tensor([iou for _, iou in SAMPLES], dtype=torch.float64)
    torch.testing.assert_close(per_sample_iou(pred, gt), expected)
    zero_policy = per_sample_iou(pred, gt, empty_iou=0.0)
    assert zero_policy[1] == 0.0 and not torch.isnan(zero_policy).any()


def test_compute_hand_cases():
    pred, gt = _stack()
    m = SegMetrics()
    m.update(pred, gt)
    out = m.compute()
    assert set(out) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-7), key


@pytest.mark.parametrize(
    "empty_iou, expected",
    [(1.0, {"gIoU": 100.0, "cIoU": 100.0, "Pr@0.9": 100.0}), (0.0, {"gIoU": 0.0, "cIoU": 0.0, "Pr@0.5": 0.0})],
)
def test_all_empty_split_follows_the_policy(empty_iou, expected):
    m = SegMetrics(empty_iou=empty_iou)
    m.update(torch.zeros(3, 4, 4, dtype=torch.bool), torch.zeros(3, 4, 4, dtype=torch.uint8))
    out = m.compute()
    for key, value in expected.items():
        assert out[key] == value
    assert out["count"] == 3


def test_no_samples_is_zero_not_nan():
    out = SegMetrics().compute()
    assert out["count"] == 0 and all(v == 0.0 for v in out.values())


def test_accumulation_order_and_merging_do_not_matter():
    g = torch.Generator().manual_seed(0)
    n = 37
    pred = torch.rand(n, 16, 16, generator=g) > torch.rand(n, 1, 1, generator=g)
    gt = (torch.rand(n, 16, 16, generator=g) > torch.rand(n, 1, 1, generator=g)).to(torch.uint8)
    pred[3], gt[3] = False, 0  # one both-empty sample

    whole = SegMetrics()
    whole.update(pred, gt)

    perm = torch.randperm(n, generator=g)
    shuffled = SegMetrics()
    for chunk in perm.split(5):
        shuffled.update(pred[chunk], gt[chunk])

    # Three "workers" merged in two different orders.
    parts = [SegMetrics() for _ in range(3)]
    for i in range(n):
        parts[(i * 7) % 3].update(pred[i : i + 1], gt[i : i + 1])
    merged_a = SegMetrics().merge(parts[0]).merge(parts[1]).merge(parts[2])
    merged_b = SegMetrics().merge(parts[2]).merge(parts[0]).merge(parts[1])
    # all_reduce is a plain sum of the state tensors.
    reduced = SegMetrics()
    reduced.state = parts[1].state + parts[2].state + parts[0].state

    for other in (shuffled, merged_a, merged_b, reduced):
        assert torch.equal(other.state, whole.state)
        assert other.compute() == whole.compute()
    assert whole.compute()["count"] == n


def test_shape_mismatch_and_policy_mismatch_rejected():
    with pytest.raises(ValueError):
        SegMetrics().update(torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError):
        SegMetrics(empty_iou=1.0).merge(SegMetrics(empty_iou=0.0))


def test_bce_loss_matches_hand_value_and_pos_weight():
    logits = torch.tensor([[[0.0, 2.0]]])
    mask = torch.tensor([[[255, 0]]], dtype=torch.uint8)
    ln2 = torch.log(torch.tensor(2.0))
    softplus2 = torch.log1p(torch.exp(torch.tensor(2.0)))
    torch.testing.assert_close(mask_bce_loss(logits, mask), (ln2 + softplus2) / 2)
    torch.testing.assert_close(mask_bce_loss(logits, mask, pos_weight=3.0), (3 * ln2 + softplus2) / 2)


def test_sample_records_and_breakdowns_on_a_hand_made_case():
    from rsrefseg.models.metrics import metrics_by, sample_records

    gt = torch.zeros(4, 10, 10, dtype=torch.uint8)
    pred = torch.zeros(4, 10, 10, dtype=torch.bool)
    gt[0, :5, :] = 1; pred[0, :5, :5] = True       # 50 gt px, 25 predicted inside: IoU 0.5, size >=20%
    gt[1, 0, 0] = 1; pred[1, 0, :2] = True         # 1 gt px of 100 (1%: bucket 1-5%), 2 predicted: IoU 0.5
    gt[2, :2, :2] = 1; pred[2, :2, :2] = True      # 4 px exact: IoU 1, size 1-5%
    pred[3, 5:, 5:] = True                         # nothing there, 25 predicted: IoU 0, size <1%
    rows = sample_records(pred, gt)
    assert rows["intersection"] == [25, 1, 4, 0] and rows["union"] == [50, 2, 4, 25]
    assert rows["gt_area"] == [50, 1, 4, 0] and rows["pred_area"] == [25, 2, 4, 25]
    assert rows["iou"] == [0.5, 0.5, 1.0, 0.0]
    assert rows["size"] == [">=20%", "1-5%", "1-5%", "<1%"]

    rows["category"] = ["road", "vehicle", "vehicle", "vehicle"]
    by_category = metrics_by(rows, "category")
    assert list(by_category) == ["vehicle", "road"]  # larger group first
    assert by_category["vehicle"]["count"] == 3
    assert by_category["vehicle"]["gIoU"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)
    assert by_category["vehicle"]["cIoU"] == pytest.approx(100 * 5 / 31)
    assert by_category["vehicle"]["Pr@0.5"] == pytest.approx(100 / 3)  # IoU > 0.5, strictly
    assert by_category["road"]["gIoU"] == pytest.approx(50.0)
    by_size = metrics_by(rows, "size", order=("<1%", "1-5%", "5-20%", ">=20%"))
    assert list(by_size) == ["<1%", "1-5%", ">=20%"]
    # the groups partition the samples: their sums give the overall cIoU
    overall = SegMetrics()
    overall.update(pred, gt)
    assert sum(v["count"] for v in by_size.values()) == 4
    assert overall.compute()["cIoU"] == pytest.approx(100 * sum(rows["intersection"]) / sum(rows["union"]))


def test_scoring_at_the_images_own_size_resizes_the_logits_not_the_mask():
    from rsrefseg.inference.scoring import score_batch

    logits = torch.full((1, 4, 4), -5.0)
    logits[0, :, :2] = 5.0  # the left half, at the 4x4 label size
    truth = np.zeros((10, 6), bool)
    truth[:, :3] = True  # the left half of a 10x6 image
    label_mask = torch.zeros(1, 4, 4, dtype=torch.uint8)
    label_mask[0, :, :1] = 1  # what a nearest resize of some other mask left at label size
    batch = {"mask": label_mask, "mask_original": [torch.from_numpy(truth)], "id": ["7"], "phrase": ["road"], "category": ["road"]}
    records = score_batch(logits, batch)
    assert records["pixels"] == [60] and records["gt_area"] == [30] and records["iou"] == [1.0]
    assert records["id"] == ["7"] and records["category"] == ["road"]
    del batch["mask_original"]  # without originals: scored at the label size
    assert score_batch(logits, batch)["iou"] == [0.5]


def test_grouped_metrics_reduce_each_source_and_the_mixture():
    from rsrefseg.models.metrics import GroupedMetrics

    acc = GroupedMetrics(["a", "b"])
    acc.add_records({"intersection": [1, 0, 3], "union": [2, 4, 3], "source": ["a", "b", "a"]})
    acc.add_records({"intersection": [2], "union": [2], "source": ["b"]})
    out = acc.compute()
    assert out["count"] == 4 and out["a/count"] == 2 and out["b/count"] == 2
    assert out["a/gIoU"] == pytest.approx(75.0) and out["b/gIoU"] == pytest.approx(50.0)
    assert out["gIoU"] == pytest.approx(62.5) and out["cIoU"] == pytest.approx(100 * 6 / 11)
    assert out["a/cIoU"] == pytest.approx(80.0)
    plain = GroupedMetrics()  # data.path alone: the mixture's names only
    plain.add_records({"intersection": [1], "union": [2]})
    assert set(plain.compute()) == set(SegMetrics().compute())


def test_grouped_metrics_all_reduce_in_one_call():
    import torch.distributed as dist

    from rsrefseg.models.metrics import GroupedMetrics
    from tests.conftest import single_process_group

    acc = GroupedMetrics(["a", "b"])
    acc.add_records({"intersection": [1, 2], "union": [2, 2], "source": ["a", "b"]})
    before = acc.compute()
    with single_process_group():
        calls = []
        original = dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: (calls.append(t.shape), original(t, *a, **k))[1]
        try:
            acc.reduce()
        finally:
            dist.all_reduce = original
    assert calls == [(3, acc.total.state.numel())]
    assert acc.compute() == before
