"""Referring-segmentation metrics: per-sample IoU, gIoU (= mIoU), cIoU (= oIoU), Pr@0.5..0.9.

Conventions: the field's, made explicit because papers and their code name and count them
differently (RMSIN, FIANet and DiCoR call gIoU "mIoU"; RMSIN calls cIoU "oIoU"; LAVT's and
RMSIN's code count Pr@X with IoU >= X):
- per-sample IoU = |P∩G| / |P∪G| on binary masks at the label resolution;
- gIoU = mean of per-sample IoU; cIoU = ΣI / ΣU over all samples;
- Pr@X = share of samples with IoU > X (strictly greater);
- a sample whose prediction and ground truth are both empty has IoU = `empty_iou` (default 1.0:
  "nothing there, nothing predicted" is a correct answer); cIoU over samples that are all empty
  (ΣU = 0) is `empty_iou` too. No metric is ever NaN.

`SegMetrics` keeps a single float64 tensor of sums, so workers combine with one
`torch.distributed.all_reduce(metrics.state)`. Every entry holds an integer value (counts, pixel
sums, and per-sample IoU in fixed point, units of 2^-30): float64 adds integers below 2^53
exactly, so the result does not depend on the order of updates, merges or reductions.
"""

from __future__ import annotations

import torch

from rsrefseg.platform.metric_names import PR_THRESHOLDS

# Fixed-point unit of the IoU sum: 2^-30 (~1e-9) resolution per sample; exact up to 2^23 samples.
IOU_SCALE = float(2**30)

# Layout of SegMetrics.state.
_COUNT, _IOU_SUM, _INTER, _UNION = 0, 1, 2, 3
_PR = 4  # _PR + i counts samples with IoU > PR_THRESHOLDS[i]
STATE_SIZE = _PR + len(PR_THRESHOLDS)


def intersection_union(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, gt: [B, H, W] (nonzero = foreground) -> intersection, union: int64 [B] pixel counts."""
    if pred.shape != gt.shape or pred.dim() != 3:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must both be [B, H, W]")
    p = pred.bool()
    g = gt > 0 if gt.dtype != torch.bool else gt
    inter = (p & g).flatten(1).sum(1)
    union = (p | g).flatten(1).sum(1)
    return inter, union


def per_sample_iou(pred: torch.Tensor, gt: torch.Tensor, *, empty_iou: float = 1.0) -> torch.Tensor:
    """pred, gt: [B, H, W] -> IoU float64 [B]; both-empty samples get `empty_iou`."""
    inter, union = intersection_union(pred, gt)
    return _iou(inter, union, empty_iou)


def _iou(inter: torch.Tensor, union: torch.Tensor, empty_iou: float) -> torch.Tensor:
    iou = inter.double() / union.clamp(min=1).double()
    return torch.where(union == 0, torch.full_like(iou, empty_iou), iou)


class SegMetrics:
    """Accumulates referring-segmentation metrics over batches (and workers)."""

    def __init__(self, *, empty_iou: float = 1.0, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= empty_iou <= 1.0:
            raise ValueError(f"empty_iou must be in [0, 1], got {empty_iou}")
        self.empty_iou = empty_iou
        # [count, Σ IoU (fixed point), Σ I, Σ U, #IoU>0.5, ..., #IoU>0.9]
        self.state = torch.zeros(STATE_SIZE, dtype=torch.float64, device=device)

    def to(self, device: torch.device | str) -> "SegMetrics":
        self.state = self.state.to(device)
        return self

    def reset(self) -> None:
        self.state.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred: bool [B, H, W] (threshold logits at 0 first); gt: [B, H, W], nonzero = foreground."""
        self.add(*intersection_union(pred, gt))

    @torch.no_grad()
    def add(self, inter: torch.Tensor, union: torch.Tensor) -> None:
        """Samples given by their intersection and union pixel counts (int64 [B])."""
        iou = _iou(inter, union, self.empty_iou)
        thresholds = torch.tensor(PR_THRESHOLDS, dtype=torch.float64, device=iou.device)
        batch = torch.cat(
            [
                torch.tensor([float(iou.numel())], dtype=torch.float64, device=iou.device),
                torch.round(iou * IOU_SCALE).sum().reshape(1),
                inter.sum().double().reshape(1),
                union.sum().double().reshape(1),
                (iou.unsqueeze(1) > thresholds).sum(0).double(),
            ]
        )
        self.state += batch.to(self.state.device)

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        """Add another accumulator's sums into this one (same empty-IoU policy required)."""
        if other.empty_iou != self.empty_iou:
            raise ValueError(f"cannot merge metrics with empty_iou {other.empty_iou} into {self.empty_iou}")
        self.state += other.state.to(self.state.device)
        return self

    def compute(self) -> dict[str, float]:
        """Metrics in percent (0-100, the paper's units) plus "count" (number of samples).

        With no samples every metric is 0.0 and count is 0.
        """
        s = self.state.detach().cpu().tolist()
        count = int(s[_COUNT])
        out: dict[str, float] = {}
        for i, x in enumerate(PR_THRESHOLDS):
            out[f"Pr@{x}"] = 100.0 * s[_PR + i] / count if count else 0.0
        if s[_UNION] > 0:
            out["cIoU"] = 100.0 * s[_INTER] / s[_UNION]
        else:
            out["cIoU"] = 100.0 * self.empty_iou if count else 0.0
        out["gIoU"] = 100.0 * s[_IOU_SUM] / IOU_SCALE / count if count else 0.0
        out["count"] = count
        return out


class GroupedMetrics:
    """SegMetrics of all samples and of each group of them (a mixture's sources, by the records'
    `source` column): validation's accumulator. Metric names: the SegMetrics names for all
    samples (the mixture), `<group>/<name>` for a group. Samples of a group not listed count in
    the total only. Workers combine all of it with one all-reduce (`reduce`)."""

    def __init__(self, groups=(), *, key: str = "source", empty_iou: float = 1.0, factory=SegMetrics) -> None:
        self.key = key
        self.total = factory(empty_iou=empty_iou)
        self.groups = {str(g): factory(empty_iou=empty_iou) for g in groups}
        self.empty_iou = self.total.empty_iou

    @torch.no_grad()
    def add_records(self, records: dict[str, list]) -> None:
        """Per-sample records (`sample_records` columns, plus `key` when there are groups)."""
        inter, union = torch.tensor(records["intersection"]), torch.tensor(records["union"])
        self.total.add(inter, union)
        labels = records.get(self.key, [])
        for name, acc in self.groups.items():
            index = [i for i, label in enumerate(labels) if label == name]
            if index:
                acc.add(inter[index], union[index])

    def reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum every accumulator over the workers of the default process group (one all-reduce)."""
        import torch.distributed as dist

        accs = [self.total, *self.groups.values()]
        state = torch.stack([acc.state for acc in accs]).to(device)
        dist.all_reduce(state)
        for acc, row in zip(accs, state.cpu()):
            acc.state = row.clone()

    def compute(self) -> dict[str, float]:
        out = self.total.compute()
        for name, acc in self.groups.items():
            out.update({f"{name}/{k}": v for k, v in acc.compute().items()})
        return out


# --------------------------------------------------------------------------------------------
# Per-sample records and breakdowns (by category, by object size)

# Object size = the ground truth's share of the image, in buckets (label, upper bound): small
# targets are where referring segmentation fails first (a vehicle in RRSIS-D covers well under
# 1% of an 800x800 image; a road or low vegetation often a fifth or more).
SIZE_BUCKETS = (("<1%", 0.01), ("1-5%", 0.05), ("5-20%", 0.20), (">=20%", float("inf")))


def size_bucket(gt_share: float) -> str:
    """The SIZE_BUCKETS label of a ground truth covering `gt_share` (0..1) of its image."""
    return next(label for label, upper in SIZE_BUCKETS if gt_share < upper)


@torch.no_grad()
def sample_records(pred: torch.Tensor, gt: torch.Tensor, *, empty_iou: float = 1.0) -> dict[str, list]:
    """pred, gt: [B, H, W] -> per-sample columns: intersection, union, gt_area, pred_area
    (pixels), pixels (H*W), iou (0..1, both-empty = `empty_iou`), size (SIZE_BUCKETS label)."""
    inter, union = intersection_union(pred, gt)
    gt_area = (gt > 0).flatten(1).sum(1)
    pred_area = pred.bool().flatten(1).sum(1)
    pixels = gt.shape[1] * gt.shape[2]
    return {
        "intersection": inter.tolist(),
        "union": union.tolist(),
        "gt_area": gt_area.tolist(),
        "pred_area": pred_area.tolist(),
        "pixels": [pixels] * gt.shape[0],
        "iou": _iou(inter, union, empty_iou).tolist(),
        "size": [size_bucket(a / pixels) for a in gt_area.tolist()],
    }


def metrics_by(rows: dict[str, list], key: str, *, empty_iou: float = 1.0, order: tuple = ()) -> dict[str, dict[str, float]]:
    """Metrics (as `SegMetrics.compute`) of each group of samples sharing `rows[key]`; groups in
    `order` first (those present), then by decreasing sample count."""
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(rows[key]):
        groups.setdefault(str(value), []).append(i)
    out = {}
    for name in sorted(groups, key=lambda g: (g not in order, order.index(g) if g in order else 0, -len(groups[g]), g)):
        acc = SegMetrics(empty_iou=empty_iou)
        index = groups[name]
        acc.add(torch.tensor([rows["intersection"][i] for i in index]), torch.tensor([rows["union"][i] for i in index]))
        out[name] = acc.compute()
    return out
