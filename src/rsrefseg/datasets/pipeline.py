"""Ray Data ingest: prepared Parquet shards -> decoded, resized, tokenized samples -> torch batches.

    ds = read_split(path, "train")                      # ray.data.read_parquet of the split's shards
    ds = preprocess(ds, sizes, tokenizer)               # map_batches on CPU tasks
    for batch in iter_batches(ds, 8): ...               # or a get_dataset_shard(...) iterator

Workers see nothing but the Parquet paths (absolute, or URIs for a shared store) and the bytes in
the rows, so the same code runs on a local Ray and on a cluster. Everything is streamed, and a
pipeline's object-store use is capped (`read_split(buffer_bytes=...)`, 1 GiB by default), so
memory stays flat whatever the dataset size.

Shuffling, per epoch, is streaming-friendly (no full `random_shuffle`, and no
`randomize_block_order`: both are all-to-all barriers that would hold the whole split in memory):
  * file order: `read_split(..., shuffle_seed=s)` reads the split's shards (64 rows each) in
    a random order that changes on every execution (= every epoch) and is reproducible from s;
  * rows: `iter_batches(..., shuffle_seed=s)` passes rows through a local shuffle buffer
    (`local_shuffle_buffer_size`, default 4x the batch), which works on Datasets and on the
    DataIterators of `ray.train.get_dataset_shard` / `streaming_split` alike. Give it
    `seed + epoch` so that epochs differ.
Order is reproducible only up to Ray's task-completion order.
"""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import ray.data
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.expressions import col

from .prepare import load_manifest, natural_key
from .triplet import DatasetError

OUTPUT_COLUMNS = ("sam_image", "siglip_image", "input_ids", "attention_mask", "mask", "id", "phrase", "category")
TEXT_COLUMNS = ("id", "phrase", "category")
PREPROCESS_BATCH_SIZE = 16  # rows per map task call: a 1024-px SAM input is 3 MiB a row
# Object-store budget of one pipeline: ~300 rows at the real presets' input sizes (3.5 MiB a
# row), far more than the trainers' prefetch needs, and a fixed ceiling whatever the split size.
STREAM_BUFFER_BYTES = 1 << 30


# --------------------------------------------------------------------------------------------
# Reading


def read_split(
    path: Union[str, Path],
    split: str,
    *,
    limit: int = 0,
    shuffle_seed: Optional[int] = None,
    buffer_bytes: Optional[int] = STREAM_BUFFER_BYTES,
):
    """The rows of one split of a prepared dataset, as a lazy `ray.data.Dataset`.

    limit: keep only the first `limit` samples (in id order, the same ones every time); 0 = all.
    shuffle_seed: None = shards in order; else shard order is shuffled anew on every execution.
    buffer_bytes: object-store memory this dataset's execution may hold (blocks read ahead,
        preprocessed blocks not yet consumed); None = Ray Data's default share of the store.
    Columns: id, phrase, split, category, image (PNG bytes), mask (PNG bytes), height, width, index.
    """
    manifest = load_manifest(path)
    counts = manifest.get("counts", {})
    if split not in counts:
        raise DatasetError(f"split {split!r} is not in the prepared dataset {path}; it has: {', '.join(counts) or 'none'}")
    shards = manifest.get("shards", {}).get(split) or []
    if counts[split] == 0 or not shards:
        raise DatasetError(f"split {split!r} of the prepared dataset {path} is empty (see warnings in its manifest.json)")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    chosen, rows = [], 0
    for shard in shards:  # shards hold consecutive `index` ranges, in order
        if limit and rows >= limit:
            break
        chosen.append(shard)
        rows += int(shard["rows"])
    base = _absolute(path)
    shuffle = None if shuffle_seed is None else ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    # Ray 2.60's default ("datasource V2") Parquet reader bin-packs the shards into a couple of
    # long read tasks whose worker memory grows with the split (measured here: 4.1 GB process
    # tree at 8k samples against 2.0 GB at 1k). The file-based reader runs one task per shard,
    # which keeps memory flat (2.0 / 2.3 GB) at the same throughput. The switch is read when the
    # plan is built, so it is flipped only around this call.
    context = ray.data.DataContext.get_current()
    previous = getattr(context, "use_datasource_v2", False)
    context.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet([f"{base}/{shard['path']}" for shard in chosen], shuffle=shuffle)
    finally:
        context.use_datasource_v2 = previous
    if limit and rows > limit:
        ds = ds.filter(expr=col("index") < limit)
    if buffer_bytes is not None:
        # Reading is much cheaper than preprocessing, so without a cap the reads run ahead until
        # Ray Data's share of the object store is full: memory would grow with the dataset. The
        # context is this dataset's own copy (and its descendants'), not the global one.
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(object_store_memory=buffer_bytes)
    return ds


def split_size(path: Union[str, Path], split: str, *, limit: int = 0) -> int:
    """Samples that `read_split(path, split, limit=limit)` yields (for step counts and schedules)."""
    count = int(load_manifest(path).get("counts", {}).get(split, 0))
    return min(count, limit) if limit else count


def _absolute(path: Union[str, Path]) -> str:
    # Workers do not share the driver's working directory (Ray jobs run in their own), so a
    # relative path would point elsewhere on them.
    text = str(path).rstrip("/")
    return text if "://" in text else str(Path(text).resolve())


# --------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(
    ds,
    sizes,
    tokenizer,
    *,
    augment: bool = False,
    shuffle_phrases: bool = False,
    seed: int = 0,
    batch_size: int = PREPROCESS_BATCH_SIZE,
    original_masks: bool = False,
    cache: bool = False,
):
    """Decode, resize and tokenize on CPU map tasks; returns a lazy `ray.data.Dataset` with

        sam_image      uint8 [3, sizes.sam_image, sizes.sam_image]        (bilinear, antialiased)
        siglip_image   uint8 [3, sizes.siglip_image, sizes.siglip_image]
        input_ids      int64 [sizes.max_text_len]
        attention_mask int64 [sizes.max_text_len]
        mask           uint8 [sizes.label, sizes.label], 0/1               (nearest)
        id, phrase, category   str (category: of the shards, even with shuffled phrases)
        mask_original  bytes: the mask's PNG at the image's own size (only with original_masks)

    sizes: an `rsrefseg.models.sizes.InputSizes`.
    tokenizer: a Hugging Face tokenizer (or any picklable callable with its call signature);
        it travels to the workers inside the map function.
    augment: random horizontal/vertical flips of the resized image and mask together; drawn
        afresh on every pass, so each epoch sees new flips (and they are not reproducible).
    cache: decode, resize and tokenize once, now (`materialize`, in the object store), so that
        every later pass (epoch) only reads the results; flips still change every pass. For
        splits whose preprocessed rows fit in memory (see `cache_fits`), e.g. `tiny`'s.
    original_masks: also pass each mask at its own size, so that scoring compares the logits
        resized to the image with the true mask, as the field's evaluation code does.
    shuffle_phrases: control experiment; each sample gets the phrase of another sample of the
        split (a seeded derangement over the whole split, in id order), so the text no longer
        describes the image. The `phrase` column then holds the phrase the model was given.
        Building the id -> phrase table runs a small Ray job that reads only those two columns.
    """
    phrase_map = None
    if shuffle_phrases:
        rows = ds.select_columns(["id", "phrase"]).take_all()  # two small columns of the split
        phrase_map = shuffled_phrases([r["id"] for r in rows], [r["phrase"] for r in rows], seed=seed)
    if original_masks and augment:
        raise ValueError("original_masks is for scoring (val/eval splits), which are never augmented")
    fn = Preprocessor(sizes=sizes, tokenizer=tokenizer, phrases=phrase_map, original_masks=original_masks)
    # An instance (not a class): Ray Data runs it as stateless tasks, which share the CPUs with
    # training instead of pinning actors to them.
    ds = ds.map_batches(fn, batch_size=batch_size, batch_format="numpy")
    if cache:
        ds = ds.materialize()
    if augment:
        ds = ds.map_batches(flip_batch, batch_size=batch_size, batch_format="numpy")
    return ds


def row_bytes(sizes, *, original_masks: bool = False) -> int:
    """About how many bytes one preprocessed row holds (what a cached split costs per sample)."""
    pixels = 3 * sizes.sam_image**2 + 3 * sizes.siglip_image**2 + sizes.label**2
    return pixels + 2 * 8 * sizes.max_text_len + (64 << 10 if original_masks else 0) + 256


def cache_fits(rows: int, sizes, budget_bytes: int, *, original_masks: bool = False) -> bool:
    return rows * row_bytes(sizes, original_masks=original_masks) <= budget_bytes


def shuffled_phrases(ids: list[str], phrases: list[str], *, seed: int) -> dict[str, str]:
    """id -> the phrase of another sample: a random cyclic derangement, so that no sample keeps
    its own phrase (it may still get an identical string, e.g. another "vehicle")."""
    if len(ids) < 2:
        raise DatasetError("shuffle_phrases needs at least two samples in the split")
    order = sorted(range(len(ids)), key=lambda i: natural_key(ids[i]))  # independent of read order
    cycle = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    return {ids[cycle[i]]: phrases[cycle[(i + 1) % len(cycle)]] for i in range(len(cycle))}


class Preprocessor:
    """The map_batches function: one batch of Parquet rows -> one batch of model inputs."""

    def __init__(self, *, sizes, tokenizer, phrases: Optional[dict[str, str]] = None, original_masks: bool = False):
        self.sizes = sizes
        self.tokenizer = tokenizer
        self.phrases = phrases
        self.original_masks = original_masks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        if self.phrases is not None:
            phrases = [self.phrases[i] for i in ids]
        else:
            phrases = [str(p) for p in batch["phrase"]]
        n, sizes = len(ids), self.sizes
        sam = np.empty((n, 3, sizes.sam_image, sizes.sam_image), np.uint8)
        siglip = np.empty((n, 3, sizes.siglip_image, sizes.siglip_image), np.uint8)
        masks = np.empty((n, sizes.label, sizes.label), np.uint8)
        for k in range(n):
            image, mask = open_png(batch["image"][k]), open_png(batch["mask"][k])
            sam[k] = resize_image(image, sizes.sam_image)
            siglip[k] = resize_image(image, sizes.siglip_image)
            masks[k] = resize_mask(mask, sizes.label)
        input_ids, attention_mask = tokenize(self.tokenizer, phrases, sizes.max_text_len)
        extra = {"mask_original": np.array(list(batch["mask"]), dtype=object)} if self.original_masks else {}
        return {
            **extra,
            "sam_image": sam,
            "siglip_image": siglip,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mask": masks,
            "id": np.array(ids, dtype=object),
            "phrase": np.array(phrases, dtype=object),
            "category": np.array([str(c) for c in batch["category"]], dtype=object),
        }


def flip_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Random horizontal and vertical flips, each row's own, the same for its images and mask.

    Flips only: aerial images have no "up", and a flip keeps every phrase true ("vehicle in the
    parking area" stays so). Left/right words would break, but RefSegRS-style phrases have none.
    Applied to the resized arrays (after a cache), so every pass draws new flips."""
    rng = np.random.default_rng()
    out = dict(batch)
    columns = ("sam_image", "siglip_image", "mask")
    for name in columns:
        out[name] = np.array(batch[name])  # a writable copy: cached blocks are read-only
    for k in range(len(batch["mask"])):
        for axis in (-1, -2):  # width, height
            if rng.random() < 0.5:
                for name in columns:
                    out[name][k] = np.flip(out[name][k], axis=axis)
    return out


def open_png(data: bytes) -> Image.Image:
    """A decoded PNG as a Pillow image (RGB, or mode "1" for masks): resizing straight from it
    saves two copies per sample over going through numpy."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def resize_image(image: Union[Image.Image, np.ndarray], size: int) -> np.ndarray:
    """RGB -> uint8 [3, size, size]. Pillow's bilinear filter widens with the scale factor, so
    downsizing is antialiased."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def resize_mask(mask: Union[Image.Image, np.ndarray], size: int) -> np.ndarray:
    """A binary mask -> uint8 0/1 [size, size], nearest neighbour (labels stay binary)."""
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(np.asarray(mask, dtype=bool))
    if mask.size != (size, size):
        mask = mask.resize((size, size), Image.NEAREST)
    return np.asarray(mask, dtype=np.uint8)


def tokenize(tokenizer, phrases: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 input_ids and attention_mask [N, max_len], padded and truncated to max_len."""
    kwargs = dict(padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    try:
        # Ask for the mask explicitly: some tokenizers (SigLIP's) leave it out by default.
        tokens = tokenizer(phrases, return_attention_mask=True, **kwargs)
    except TypeError:
        tokens = tokenizer(phrases, **kwargs)
    input_ids = np.asarray(tokens["input_ids"], dtype=np.int64)
    if "attention_mask" in tokens:
        attention_mask = np.asarray(tokens["attention_mask"], dtype=np.int64)
    else:
        attention_mask = np.ones_like(input_ids)
    if input_ids.shape != (len(phrases), max_len):
        raise ValueError(f"tokenizer returned input_ids of shape {input_ids.shape}, expected {(len(phrases), max_len)}")
    return input_ids, attention_mask


# --------------------------------------------------------------------------------------------
# Iterating


class TorchCollate(NumpyBatchCollateFn):
    """Numeric columns -> torch tensors (no copy when the array is writable); text columns
    ("id", "phrase", "category") -> lists of str."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for name, values in batch.items():
            if name in TEXT_COLUMNS or values.dtype.kind not in "biuf":
                out[name] = [v if isinstance(v, (str, bytes)) else str(v) for v in values]
            else:
                if not (values.flags.writeable and values.flags.c_contiguous):
                    values = np.array(values)  # torch wants writable, contiguous memory
                out[name] = torch.from_numpy(values)
        return out


def iter_batches(
    ds_or_shard,
    batch_size: int,
    *,
    shuffle_seed: Optional[int] = None,
    local_shuffle_buffer_size: Optional[int] = None,
    drop_last: bool = False,
    device=None,
    prefetch_batches: int = 1,
    timeout_s: float = 0.0,
    on_timeout: Optional[Callable[[], str]] = None,
) -> Iterator[dict[str, Any]]:
    """Batches of a preprocessed Dataset, or of a DataIterator (`ray.train.get_dataset_shard`,
    `Dataset.streaming_split`): dicts of torch tensors, with "id", "phrase" and "category" as lists of str.

    shuffle_seed: None = no shuffling (unless local_shuffle_buffer_size is given: then unseeded).
        Otherwise rows go through a local shuffle buffer of `local_shuffle_buffer_size` rows
        (default 4 x batch_size) seeded with it.
    device: None = leave tensors on the CPU; "auto" = the Ray Train worker's device (CPU outside
        Ray Train); or any torch device. Ray does not move batches that carry strings, so the
        move happens here.
    timeout_s: > 0 = raise `BatchTimeout` when the next batch takes longer than this to arrive
        (a starved or stuck pipeline), with `on_timeout()`'s text (the cluster's free resources)
        in the message; 0 = wait forever.
    """
    if shuffle_seed is not None and local_shuffle_buffer_size is None:
        local_shuffle_buffer_size = 4 * batch_size
    batches = ds_or_shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=TorchCollate(),
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=shuffle_seed if local_shuffle_buffer_size else None,
        prefetch_batches=prefetch_batches,
    )
    target = _resolve_device(device)
    if timeout_s:
        batches = watched(batches, timeout_s, on_timeout=on_timeout)
    for batch in batches:
        if target is not None:
            batch = {k: v.to(target) if hasattr(v, "to") else v for k, v in batch.items()}
        yield batch


class BatchTimeout(RuntimeError):
    """No batch arrived in time: the pipeline is starved of CPUs or stuck."""


def watched(items: Iterator, timeout_s: float, *, on_timeout: Optional[Callable[[], str]] = None) -> Iterator:
    """`items`, pulled by a helper thread, with at most `timeout_s` seconds of waiting per item.

    Only the consumer's wait is timed (the helper holds one item ahead while the consumer
    trains), so a long training step never counts against the limit."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    done = threading.Event()

    def offer(message: tuple) -> bool:
        """Hand `message` over once the consumer takes the last; False once it has stopped."""
        while not done.is_set():
            try:
                slot.put(message, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(("error", exc))

    threading.Thread(target=pump, name="batch-watchdog", daemon=True).start()
    delivered = 0
    try:
        while True:
            try:
                kind, value = slot.get(timeout=timeout_s)
            except queue.Empty:
                detail = on_timeout() if on_timeout else ""
                raise BatchTimeout(
                    f"no batch for {timeout_s:g} s after {delivered} batch(es): the data pipeline is stuck or has "
                    f"no CPU to run on (train workers holding every CPU starve Ray Data). {detail} "
                    "Check train.num_workers x train.cpus_per_worker against the cluster's CPUs, or raise "
                    "train.batch_timeout_s if batches are just slow to come"
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            delivered += 1
            yield value
    finally:
        done.set()


def _resolve_device(device):
    import torch

    if device is None:
        return None
    if device == "auto":
        try:
            from ray.train.utils import _in_ray_train_worker  # the same test Ray's own "auto" uses

            if _in_ray_train_worker():
                from ray.train.torch import get_device

                return get_device()
        except ImportError:
            pass
        return None
    target = torch.device(device)
    return None if target.type == "cpu" else target
