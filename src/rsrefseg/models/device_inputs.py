"""The second half of preprocessing, batched on the consumer's device: a batch of the data
pipeline (pixels at their stored size, masks bit-packed) -> the model's inputs.

    inputs = model_batch(batch, sizes, device, augment=True)     # a training step
    inputs = model_batch(batch, sizes, device, originals=True)   # validation, evaluation

    sam_image      uint8 [B, 3, S, S]        RGB at SAM's input size (bilinear, antialiased)
    siglip_image   uint8 [B, 3, s, s]        RGB at SigLIP's input size
    input_ids, attention_mask                on the device
    mask           uint8 [B, label, label]   0/1, nearest (what the loss compares with);
                                             IGNORE_LABEL on letterbox padding (keep_ratio)
    valid          list of (rows, cols)      each image's area at the label size (keep_ratio only)
    mask_original  list of bool [h, w]       each mask at its image's own size (for scoring;
                                             only with originals=True)
    id, phrase, category, source             lists of str

A batch of a pipeline with `decode="gpu"` (config `data.decode: gpu`) carries the JPEG files of
some rows undecoded (its "jpeg" column; those rows' images are empty): they are decoded here,
batched, on the device (`torchvision.io.decode_jpeg`: nvJPEG on a GPU, libjpeg-turbo on a CPU,
where the pixels are exactly the CPU pipeline's), before anything else.

`F.interpolate(..., antialias=True)` is torch's port of Pillow's resampling filters: it matches
the CPU reference (`pipeline.resize_image`, Pillow's BILINEAR) within one level of 255, and
masks take exactly the pixels Pillow's NEAREST takes (`tests/models/test_device_inputs.py`).
Results are rounded back to uint8 so that the model sees exactly the kind of input it saw when
resizing ran on the CPU. On a GPU the whole batch takes well under a millisecond; on a CPU
worker it is the work the CPU map tasks used to do, without the 3.5 MiB a sample of resized
pixels that crossed the object store.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from rsrefseg.models.sizes import IGNORE_LABEL, InputSizes, fit_inside

# The text columns a batch carries through to the per-sample records (not tensors).
TEXT_COLUMNS = ("id", "phrase", "category", "source")

Pixels = Union[torch.Tensor, Sequence]  # a stacked [B, ...] tensor, or one array per sample


def model_batch(batch: dict, sizes: InputSizes, device: Union[torch.device, str], *, augment: bool = False,
                originals: bool = False, generator: Optional[torch.Generator] = None) -> dict:
    """The model's inputs (see the module docstring) from a pipeline batch, on `device`.

    augment: random horizontal and vertical flips, each sample its own, the same for its images
        and mask (drawn from `generator`, default torch's global RNG). Aerial images have no
        "up", and flips keep RefSegRS-style phrases true (they have no left/right words).
    originals: also return the unpacked masks at their own size, for scoring.
    """
    if augment and originals:
        raise ValueError("originals are for scoring (val/eval splits), which are never augmented")
    device = torch.device(device)
    widths = [int(w) for w in _as_list(batch["width"])]
    images = device_images(batch, device)
    sam_image, siglip_image, _ = model_images(images, sizes)
    out = {
        "sam_image": sam_image,
        "siglip_image": siglip_image,
        "input_ids": _to(batch["input_ids"], device),
        "attention_mask": _to(batch["attention_mask"], device),
    }
    masks = unpack_masks(_to(batch["mask"], device), widths)
    out["mask"] = letterbox_masks(masks, sizes.label) if sizes.keep_ratio else resize_masks(masks, sizes.label)
    if sizes.keep_ratio:  # from the true size (the pipeline may have shrunk the image)
        out["valid"] = [fit_inside(int(h), int(w), sizes.label) for h, w in zip(_as_list(batch["height"]), widths)]
    if originals:
        out["mask_original"] = list(masks)
    if augment:
        flip_together(out, ("sam_image", "siglip_image", "mask"), generator=generator)
    for name in TEXT_COLUMNS:
        if name in batch:
            out[name] = [str(v) for v in batch[name]]
    return out


def device_images(batch: dict, device: torch.device) -> Pixels:
    """batch["image"] on `device`, with the rows whose JPEG file the pipeline left in
    batch["jpeg"] decoded there: [B, H, W, 3] when every image has one size, else one per sample."""
    files = batch.get("jpeg")
    images = _to(batch["image"], device)
    if files is None or not any(len(f) for f in files):
        return images
    from torchvision.io import ImageReadMode, decode_jpeg

    which = [k for k, f in enumerate(files) if len(f)]
    encoded = [torch.frombuffer(bytearray(files[k]), dtype=torch.uint8) for k in which]
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    rows = list(images)
    heights, widths = _as_list(batch["height"]), _as_list(batch["width"])
    for k, chw in zip(which, decoded):
        if tuple(chw.shape) != (3, int(heights[k]), int(widths[k])):  # the pipeline checked the header
            raise ValueError(f"sample {k}: its JPEG decoded to {tuple(chw.shape)}, not {(3, heights[k], widths[k])}")
        rows[k] = chw.permute(1, 2, 0)
    if len({tuple(r.shape) for r in rows}) == 1:
        return torch.stack(rows)
    return rows


def resize_images(images: Pixels, size: int) -> torch.Tensor:
    """uint8 RGB [B, H, W, 3] (or one [H, W, 3] per sample) -> uint8 [B, 3, size, size]."""
    if not torch.is_tensor(images):
        return torch.cat([resize_images(image[None], size) for image in images])
    x = images.permute(0, 3, 1, 2)  # a channels-last view: no copy
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def model_images(images: Pixels, sizes: InputSizes) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """(sam_image, siglip_image, valid): uint8 RGB [B, H, W, 3] (or one [H, W, 3] per sample) at
    the model's two input sizes, and each sample's image area at the label size, (rows, cols).

    Stretched to the squares (RSRefSeg: the whole label is image), or with `sizes.keep_ratio`
    letterboxed as RSRefSeg-2's authors do: resized to fit SAM's square with the aspect ratio
    kept, padded with 0 at the bottom/right, and SigLIP's input the whole padded canvas resized."""
    if not sizes.keep_ratio:
        count = images.shape[0] if torch.is_tensor(images) else len(images)
        valid = [(sizes.label, sizes.label)] * count
        return resize_images(images, sizes.sam_image), resize_images(images, sizes.siglip_image), valid
    shapes = [tuple(image.shape[:2]) for image in images]
    canvas = letterbox_images(images, sizes.sam_image)
    siglip = canvas if sizes.siglip_image == sizes.sam_image else _resize_chw(canvas, sizes.siglip_image)
    return canvas, siglip, [fit_inside(h, w, sizes.label) for h, w in shapes]


def letterbox_images(images: Pixels, size: int) -> torch.Tensor:
    """uint8 RGB [B, H, W, 3] (or one [H, W, 3] per sample) -> uint8 [B, 3, size, size]: each
    resized to fit (bilinear, antialiased), aspect kept, zero-padded at the bottom/right."""
    if torch.is_tensor(images) and images.shape[1] == images.shape[2]:
        return resize_images(images, size)  # square: letterboxing is a plain resize
    if torch.is_tensor(images) and images.shape[0] > 1:
        images = list(images)
    if not torch.is_tensor(images):
        return torch.cat([letterbox_images(image[None], size) for image in images])
    rows, cols = fit_inside(images.shape[1], images.shape[2], size)
    x = images.permute(0, 3, 1, 2)
    y = F.interpolate(x.float(), size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
    y = y.round_().clamp_(0, 255).to(torch.uint8)
    return F.pad(y, (0, size - cols, 0, size - rows)).contiguous()


def letterbox_masks(masks: Pixels, size: int) -> torch.Tensor:
    """bool [B, h, w] (or one [h, w] per sample) -> uint8 [B, size, size]: 0/1 inside the image
    area (nearest, as `resize_masks`), IGNORE_LABEL on the padding."""
    if not torch.is_tensor(masks) or masks.shape[0] > 1 and masks.shape[1] != masks.shape[2]:
        return torch.cat([letterbox_masks(m[None], size) for m in masks])
    rows, cols = fit_inside(masks.shape[1], masks.shape[2], size)
    x = masks.to(torch.uint8)
    r, c = (_nearest(n, k).to(x.device) for n, k in ((x.shape[1], rows), (x.shape[2], cols)))
    x = x.index_select(-2, r).index_select(-1, c)
    return F.pad(x, (0, size - cols, 0, size - rows), value=IGNORE_LABEL)


def crop_valid(logits: torch.Tensor, valid: Optional[Sequence[tuple[int, int]]]) -> list[torch.Tensor]:
    """[B, L, L] logits -> each sample's image area (`valid` from `model_images`; None: all)."""
    if valid is None:
        return list(logits)
    return [logit[:rows, :cols] for logit, (rows, cols) in zip(logits, valid)]


def _resize_chw(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> uint8 [B, 3, size, size]: plain bilinear, without antialiasing, as
    RSRefSeg-2's authors resize the padded canvas for SigLIP (1024 -> 512: a 2 x 2 average)."""
    y = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def unpack_masks(packed: Pixels, widths: Sequence[int]) -> Union[torch.Tensor, list]:
    """Rows of bits packed MSB first (uint8 [B, h, ceil(w/8)], or one [h, ceil(w/8)] per sample)
    -> bool [B, h, w] (a list of [h, w] when sizes differ)."""
    if not torch.is_tensor(packed) or len(set(widths)) > 1:
        return [unpack_masks(p[None], [w])[0] for p, w in zip(packed, widths)]
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [B, h, wb, 8]
    return bits.flatten(-2)[..., : widths[0]].bool()


def resize_masks(masks: Pixels, size: int) -> torch.Tensor:
    """bool [B, h, w] (or one [h, w] per sample) -> uint8 0/1 [B, size, size], nearest."""
    if not torch.is_tensor(masks):
        return torch.cat([resize_masks(m[None], size) for m in masks])
    x = masks.to(torch.uint8)
    if x.shape[-2:] == (size, size):
        return x
    rows, cols = (_nearest(n, size).to(x.device) for n in x.shape[-2:])
    return x.index_select(-2, rows).index_select(-1, cols)


def _nearest(n: int, size: int) -> torch.Tensor:
    """The source index of each of `size` outputs over `n` inputs, exactly as Pillow's NEAREST
    (ImagingScaleAffine) computes it: the output pixel centre in float64, stepped by adding the
    scale up from half of it. Where a centre falls on a pixel edge (512 -> 384: every third
    line) only this arithmetic lands on Pillow's pixel; "nearest-exact" in float32 may not."""
    steps = np.full(size, n / size, dtype=np.float64)
    steps[0] *= 0.5
    return torch.from_numpy(np.minimum(np.cumsum(steps).astype(np.int64), n - 1))


def flip_together(tensors: dict, names: Sequence[str], *, generator: Optional[torch.Generator] = None) -> None:
    """Flip each sample of `tensors[name]` (all [B, ..., H, W]) horizontally and/or vertically,
    in place of the dict's values; a sample's flips are the same in every named tensor."""
    batch = tensors[names[0]].shape[0]
    draws = torch.rand(batch, 2, generator=generator) < 0.5  # on the CPU: same draws on any device
    for name in names:
        x = tensors[name]
        shape = (batch,) + (1,) * (x.dim() - 1)
        for axis, column in ((-1, 0), (-2, 1)):
            flip = draws[:, column].to(x.device).view(shape)
            x = torch.where(flip, x.flip(axis), x)
        tensors[name] = x


def _to(values, device: torch.device):
    if torch.is_tensor(values):
        return values.to(device, non_blocking=True)
    if isinstance(values, np.ndarray) and values.dtype != object:
        if not (values.flags.writeable and values.flags.c_contiguous):
            values = np.array(values)  # torch wants writable, contiguous memory
        return torch.from_numpy(values).to(device)
    return [_to(v if torch.is_tensor(v) else np.asarray(v), device) for v in values]


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)
