"""Ray Data ingest: prepared Parquet shards -> tokenized samples at their stored size -> torch batches.

    ds = read_split(path, "train")                      # ray.data.read_parquet of the split's shards
    ds = preprocess(ds, sizes, tokenizer)               # map_batches on CPU tasks
    for batch in iter_batches(ds, 8):                   # or a get_dataset_shard(...) iterator
        inputs = model_batch(batch, sizes, device)      # resized, unpacked (and flipped) on the device

Workers see nothing but the Parquet paths (absolute, or bucket/key paths with the store's pyarrow
filesystem for `s3://...`: read tasks stream the shards from the store) and the bytes in the rows,
so the same code runs on a local Ray and on a cluster. Everything is streamed, and a
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

import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import ray.data
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.expressions import col

from rsrefseg.platform import storage

from .prepare import MANIFEST, check_shard_path, load_manifest, natural_key
from .shard_codec import JPEG, RAW, binary_rows, check_header, iter_images, packed_width, pixel_rows
from .triplet import DatasetError

OUTPUT_COLUMNS = ("image", "mask", "height", "width", "input_ids", "attention_mask", "id", "phrase", "category",
                  "source")
TEXT_COLUMNS = ("id", "phrase", "category", "source")
# Where JPEG rows are decoded (config `data.decode`): "cpu" in the map tasks; "gpu" on the
# consumer's device (`models.device_inputs`), the file's bytes travelling in the DEVICE_JPEG column.
DECODE = ("cpu", "gpu")
DEVICE_JPEG = "jpeg"
# Rows per map task call. None = the whole block a read task produced (one shard), which lets
# Ray fuse the map into the read task: the raw rows then never enter the object store. Measured
# (benchmarks/ingest.py, 20k samples of 512 x 512, 2 CPUs): fused 830 samples/s and 1.0 GB of
# object store at peak; 64-row batches (a separate map operator) 550 and 1.6 GB.
PREPROCESS_BATCH_SIZE = None
# Object-store budget of one pipeline: ~1,200 rows of 512 x 512 images (0.8 MiB a row), far more
# than the trainers' prefetch needs, and a fixed ceiling whatever the split size.
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
    Columns: id, phrase, split, category, image and mask (see shard_codec), height, width, index,
    and encoding (how `image` is stored; absent from shards prepared before it: all raw).
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
    files, filesystem = _shard_files(path, chosen, split)
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
        # One block per shard (no extra splitting of a read's output): then the read task and
        # `preprocess`'s map fuse into one task. Split blocks would each be a map task of their
        # own, and a read task waiting for them to drain holds a CPU they need: with one CPU
        # left for ingest (evaluation beside its model replica) that stalled scoring.
        ds = ray.data.read_parquet(files, filesystem=filesystem, shuffle=shuffle, override_num_blocks=len(chosen))
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


def without_operator_reservations(ds):
    """`ds` executed without Ray Data's per-operator reservations, for a stream whose one task
    operator is the read fused with `preprocess` and whose consumer is a loop (a train worker's
    shard, a driver's `iter_batches`).

    Ray Data 2.60 splits an execution's CPUs and object store into a reserved share per operator
    and a shared pool, and renews the CPU limit from its autoscaling coordinator, which starts each
    execution (each epoch) at none. Measured on 2 CPUs with JPEG shards at rsrefseg-b sizes: the
    read tasks then leave the CPUs idle, 224-257 samples/s, against 349-360 without the
    reservations (docs/performance.md, "Ingest"). The stream's object-store cap
    (`read_split(buffer_bytes=...)`) still bounds its memory. Not for a stream that feeds an actor
    pool (`inference.replicas`): there the reservation keeps the replicas' share of the budget,
    and without it the reads could fill the cap with blocks the replicas have no budget to take."""
    ds.context.op_resource_reservation_enabled = False
    return ds


def split_size(path: Union[str, Path], split: str, *, limit: int = 0) -> int:
    """Samples that `read_split(path, split, limit=limit)` yields (for step counts and schedules)."""
    count = int(load_manifest(path).get("counts", {}).get(split, 0))
    return min(count, limit) if limit else count


def _shard_files(path: Union[str, Path], shards: list[dict], split: str = "") -> tuple[list[str], Any]:
    """The shards' paths and the pyarrow filesystem they are in (None: this machine's disk), as
    `read_parquet` takes them. On object storage, the read tasks stream the shards from the store
    with the driver's filesystem (endpoint and region; every node has its own credentials).

    The shards come from one reading of the manifest, so they are all of the one version it
    published (prepare.py, "Publishing is versioned"). A newer prepare deletes that version once
    its own manifest is published: a pipeline still streaming it then fails on the first shard
    that is gone, with pyarrow's "not found" naming it (`<path>/v-.../<split>/part-NNNNN.parquet`);
    run again, it reads the new version. Each path is checked to lie inside the dataset first
    (load_manifest checked them too): a manifest never makes a job read another dataset's files."""
    where = storage.location(str(path).rstrip("/"))
    manifest = f"{str(path).rstrip('/')}/{MANIFEST}"
    relative = [check_shard_path(manifest, split, shard.get("path")) for shard in shards]
    if isinstance(where, storage.RemotePath):
        return [f"{where.path}/{name}" for name in relative], where.fs
    # Workers do not share the driver's working directory (Ray jobs run in their own), so a
    # relative path would point elsewhere on them.
    base = where.resolve()
    return [str(base / name) for name in relative], None


# --------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(
    ds,
    sizes,
    tokenizer,
    *,
    shuffle_phrases: bool = False,
    seed: int = 0,
    batch_size: Optional[int] = PREPROCESS_BATCH_SIZE,
    cache: bool = False,
    source: str = "",
    phrases_of=None,
    decode: str = "cpu",
):
    """Decode and tokenize on CPU map tasks; returns a lazy `ray.data.Dataset` with

        image          uint8 [H, W, 3]  RGB at the image's stored size (raw shards: no decoding
                                        work; JPEG/PNG shards: decoded here, on CPU, see shard_codec),
                                        or at most sizes.sam_image a side (see below)
        mask           uint8 [H', ceil(W'/8)]  the mask at the image's own size, bits still packed
        height, width  int32            the mask's (= the stored image's) size
        input_ids      int64 [sizes.max_text_len]
        attention_mask int64 [sizes.max_text_len]
        id, phrase, category   str (category: of the shards, even with shuffled phrases)
        source         str              the row's source in a mixture (data.sources); "" else
        jpeg           bytes            decode="gpu" only: the file of a JPEG row left for the
                                        device (its `image` empty, [0, 0, 3]); b"" for other rows

    Resizing to the model's inputs, normalizing, unpacking the mask and flips happen batched on
    the consumer's device (`models.device_inputs.model_batch`: 0.8 MiB a 512 x 512 sample through
    the object store instead of 3.5 MiB). Images larger than the SAM input are shrunk here
    (`Preprocessor.shrunk`); their masks stay at full size, for scoring.

    sizes: an `rsrefseg.models.sizes.InputSizes`.
    tokenizer: a Hugging Face tokenizer (or any picklable callable with its call signature);
        it travels to the workers inside the map function.
    cache: decode and tokenize once, now (`materialize`, in the object store), so that every
        later pass (epoch) only reads the results. For splits whose rows fit in memory (see
        `cache_fits`), e.g. `tiny`'s.
    shuffle_phrases: control experiment; each sample gets the phrase of another sample of the
        split (a seeded derangement over the whole split, in id order), so the text no longer
        describes the image. The `phrase` column then holds the phrase the model was given.
        Building the id -> phrase table runs a small Ray job that reads only those two columns
        (of `phrases_of` when given: the whole split of a source whose rows `ds` samples).
    """
    phrase_map = None
    if shuffle_phrases:
        rows = (phrases_of or ds).select_columns(["id", "phrase"]).take_all()  # two small columns of the split
        phrase_map = shuffled_phrases([r["id"] for r in rows], [r["phrase"] for r in rows], seed=seed)
    fn = Preprocessor(sizes=sizes, tokenizer=tokenizer, phrases=phrase_map, source=source, decode=decode)
    # An instance (not a class): Ray Data runs it as stateless tasks, which share the CPUs with
    # training instead of pinning actors to them.
    ds = ds.map_batches(fn, batch_size=batch_size, batch_format="pyarrow")
    if cache:
        # Kept in read order, not in the order the tasks happen to finish: Ray Train's split hands
        # a cached split's blocks to the workers by their order, so a run's batches (and so its
        # losses) depend only on the config and train.seed. A streamed split stays unordered:
        # ordering its output would hold every task back behind the slowest.
        ds.context.execution_options.preserve_order = True
        ds = ds.materialize()
    return ds


def row_bytes(height: int, width: int, sizes) -> int:
    """About how many bytes one preprocessed row of an image of this size holds."""
    rows, cols = sizes.shrunk_shape(height, width)  # Preprocessor.shrunk
    return 3 * rows * cols + height * packed_width(width) + 2 * 8 * sizes.max_text_len + 256


def cache_fits(rows: int, largest: tuple[int, int], sizes, budget_bytes: int) -> bool:
    """Whether `rows` preprocessed rows, none larger than `largest` (height, width), fit the budget."""
    return rows * row_bytes(*largest, sizes) <= budget_bytes


def shuffled_phrases(ids: list[str], phrases: list[str], *, seed: int) -> dict[str, str]:
    """id -> the phrase of another sample: a random cyclic derangement, so that no sample keeps
    its own phrase (it may still get an identical string, e.g. another "vehicle")."""
    if len(ids) < 2:
        raise DatasetError("shuffle_phrases needs at least two samples in the split")
    order = sorted(range(len(ids)), key=lambda i: natural_key(ids[i]))  # independent of read order
    cycle = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    return {ids[cycle[i]]: phrases[cycle[(i + 1) % len(cycle)]] for i in range(len(cycle))}


class Preprocessor:
    """The map_batches function: one batch of Parquet rows (a pyarrow Table) -> one batch for
    the consumer's device. Raw pixels are never copied here: the output arrays are views of the
    Parquet buffers, which Ray copies once, into the object store; decoded pixels are written
    once, into the batch (`_stacked`)."""

    def __init__(self, *, sizes, tokenizer, phrases: Optional[dict[str, str]] = None, source: str = "",
                 decode: str = "cpu"):
        if decode not in DECODE:
            raise ValueError(f"decode must be one of {', '.join(DECODE)}, got {decode!r}")
        self.sizes = sizes
        self.tokenizer = tokenizer
        self.phrases = phrases
        self.source = source
        self.decode = decode

    def __call__(self, batch) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch.column("id").to_pylist()]
        if self.phrases is not None:
            phrases = [self.phrases[i] for i in ids]
        else:
            phrases = [str(p) for p in batch.column("phrase").to_pylist()]
        heights = batch.column("height").to_numpy().astype(np.int32)
        widths = batch.column("width").to_numpy().astype(np.int32)
        sizes = list(zip(heights.tolist(), widths.tolist()))
        images, device_jpegs = self.images(batch, sizes, ids)
        masks = pixel_rows(batch.column("mask"), [(h, packed_width(w)) for h, w in sizes], [f"mask of {i!r}" for i in ids])
        input_ids, attention_mask = tokenize(self.tokenizer, phrases, self.sizes.max_text_len)
        out = {
            "image": self.shrunk(images),
            "mask": masks,
            "height": heights,
            "width": widths,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "id": np.array(ids, dtype=object),
            "phrase": np.array(phrases, dtype=object),
            "category": np.array([str(c) for c in batch.column("category").to_pylist()], dtype=object),
            "source": np.array([self.source] * len(ids), dtype=object),
        }
        if self.decode == "gpu":
            out[DEVICE_JPEG] = device_jpegs
        return out

    def images(self, batch, sizes: list[tuple[int, int]], ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the batch's images as uint8 [H, W, 3], the JPEG files left for the device): images
        are views of the Parquet buffers when raw, decoded (JPEG at reduced size when larger than
        sizes.sam_image, see shard_codec) when shipped, and empty ([0, 0, 3]) where their file is
        left for the device (decode="gpu": a JPEG not larger than sizes.sam_image, so that the
        device decodes exactly what the CPU would; its header checked here)."""
        shapes, whats = [(h, w, 3) for h, w in sizes], [f"image of {i!r}" for i in ids]
        names = batch.column_names if hasattr(batch, "column_names") else list(batch)
        encodings = [str(e) for e in batch.column("encoding").to_pylist()] if "encoding" in names else [RAW] * len(ids)
        files = np.full(len(ids), b"", dtype=object)
        if all(e == RAW for e in encodings):
            return pixel_rows(batch.column("image"), shapes, whats), files
        rows = binary_rows(batch.column("image"))
        side = self.sizes.sam_image
        for k, (data, encoding, (h, w), what) in enumerate(zip(rows, encodings, sizes, whats)):
            if self.decode == "gpu" and encoding == JPEG and max(h, w) <= side and check_header(data, JPEG, shapes[k], what):
                files[k] = data.tobytes()
        on_device = [bool(f) for f in files]
        decoded = iter_images([r for r, d in zip(rows, on_device) if not d], [e for e, d in zip(encodings, on_device) if not d],
                              [s for s, d in zip(shapes, on_device) if not d], [t for t, d in zip(whats, on_device) if not d],
                              max_side=side)
        empty = np.zeros((0, 0, 3), np.uint8)
        return _stacked((empty if d else next(decoded) for d in on_device), len(rows)), files

    def shrunk(self, images: np.ndarray) -> np.ndarray:
        """Images larger than the SAM input on a side, resized to it here (bilinear, as the model
        input would be): more pixels than any model input reads need not travel. To the square,
        or (sizes.keep_ratio, RSRefSeg-2) to fit inside it with the aspect kept, so the device's
        letterbox pads the image as its mask is padded."""
        rows = list(images)
        shapes = [self.sizes.shrunk_shape(*image.shape[:2]) for image in rows]
        if all(shape == image.shape[:2] for shape, image in zip(shapes, rows)):
            return images
        small = [image if shape == image.shape[:2] else
                 np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))
                 for shape, image in zip(shapes, rows)]
        return _stacked(small, len(small))


def _stacked(images: Iterable[np.ndarray], count: int) -> np.ndarray:
    """[N, H, W, 3] when the `count` images share a shape, else an object array of them. Each
    image is copied into the batch as it comes (while it is in the CPU's cache, and without a
    list of them all beside the batch: decoded images are produced one at a time)."""
    out, done = None, []
    for k, image in enumerate(images):
        if out is None and not done:
            out = np.empty((count, *image.shape), dtype=image.dtype)
        if out is not None and image.shape == out.shape[1:]:
            out[k] = image
            continue
        if out is not None:  # shapes differ: the rows so far become views of the batch
            done, out = list(out[:k]), None
        done.append(image)
    if out is not None:
        return out
    objects = np.empty(len(done), dtype=object)
    for k, image in enumerate(done):  # one by one: numpy would read a list of arrays as one array
        objects[k] = image
    return objects


def resize_image(image: Union[Image.Image, np.ndarray], size: int) -> np.ndarray:
    """RGB -> uint8 [3, size, size]. Pillow's bilinear filter widens with the scale factor, so
    downsizing is antialiased. The CPU reference of `device_inputs.resize_images` (and what
    `predict` does to a scene's tiles)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def resize_mask(mask: Union[Image.Image, np.ndarray], size: int) -> np.ndarray:
    """A binary mask -> uint8 0/1 [size, size], nearest neighbour (labels stay binary). The CPU
    reference of `device_inputs.resize_masks`."""
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
    """Numeric columns -> torch tensors (no copy when the array is writable); a column of arrays
    of different shapes (images of different sizes) -> a list of tensors; text columns ("id",
    "phrase", "category") -> lists of str."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, values in batch.items():
            if values.dtype.kind in "biuf":
                out[name] = _tensor(values)
            elif name not in TEXT_COLUMNS and len(values) and isinstance(values[0], np.ndarray):
                out[name] = [_tensor(v) for v in values]
            else:
                out[name] = [v if isinstance(v, (str, bytes)) else str(v) for v in values]
        return out


def _tensor(values: np.ndarray):
    import torch

    if not (values.flags.writeable and values.flags.c_contiguous):
        values = np.array(values)  # torch wants writable, contiguous memory
    return torch.from_numpy(values)


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
