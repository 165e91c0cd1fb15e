"""The Ray Data pipeline: read_split -> preprocess -> iter_batches, on one shared local Ray."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from rsrefseg.datasets.pipeline import _stacked, iter_batches, preprocess, read_split, shuffled_phrases, split_size, tokenize
from rsrefseg.datasets.prepare import prepare_dataset
from rsrefseg.datasets.triplet import DatasetError
from rsrefseg.models.sizes import InputSizes

from .conftest import make_refsegrs, make_rrsisd

pytestmark = pytest.mark.usefixtures("ray_session")

# Square 32x32 fixtures and label == SAM size == 32: resizing is the identity, so pixels can be
# compared exactly with the source files.
IDENTITY = InputSizes(sam_image=32, siglip_image=16, label=32, max_text_len=8)


def unpacked(batch_masks, widths) -> list[np.ndarray]:
    """The pipeline's packed masks as bool arrays (rows of bits, MSB first)."""
    return [np.unpackbits(np.asarray(m), axis=-1)[..., : int(w)].astype(bool) for m, w in zip(batch_masks, widths)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    expected = make_refsegrs(root / "src", counts=(("train", 7), ("val", 4), ("test", 2)), size=(32, 32), repeat_mask=False)
    prepare_dataset("refsegrs", root / "src", root / "out", rows_per_shard=2)
    return root / "out", expected


def collect(ds, batch_size=4, **kwargs) -> dict[str, list]:
    out: dict[str, list] = {}
    for batch in iter_batches(ds, batch_size, **kwargs):
        for name, values in batch.items():
            out.setdefault(name, []).extend(list(values))
    return out


def test_batches_follow_the_contract(prepared_synthetic, tokenizer):
    # RSRefSeg-b's sizes: the 512 x 512 images travel as stored (SAM's 1024 is made on the device)
    sizes = InputSizes(sam_image=1024, siglip_image=384, label=512, max_text_len=8)
    ds = preprocess(read_split(prepared_synthetic, "val"), sizes, tokenizer)
    batch = next(iter_batches(ds, 3))
    assert set(batch) == {"image", "mask", "height", "width", "input_ids", "attention_mask", "id", "phrase", "category",
                          "source"}
    assert batch["source"] == [""] * 3  # data.path alone; a mixture's rows carry their source's name
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 512, 512, 3)
    assert batch["mask"].dtype == torch.uint8 and batch["mask"].shape == (3, 512, 64)  # bits, packed
    assert batch["height"].tolist() == batch["width"].tolist() == [512] * 3
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (3, 8)
    assert batch["attention_mask"].dtype == torch.int64 and batch["attention_mask"].shape == (3, 8)
    assert all(isinstance(x, str) for x in batch["id"] + batch["phrase"] + batch["category"])
    # under 1 MiB a sample through the object store (it was 3.5 MiB resized to 1024 and 384 px)
    per_sample = sum(v[0].numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
    assert per_sample < 1 << 20
    # tiny's sizes: no model input is larger than 64 px, so the images are shrunk before they travel
    tiny = InputSizes(sam_image=64, siglip_image=64, label=64, max_text_len=8)
    batch = next(iter_batches(preprocess(read_split(prepared_synthetic, "val"), tiny, tokenizer), 3))
    assert batch["image"].shape == (3, 64, 64, 3) and batch["mask"].shape == (3, 512, 64)
    from rsrefseg.datasets.synthetic import PHRASES

    assert batch["category"] == [PHRASES[p].family for p in batch["phrase"]]  # carried from the shards


def test_ids_phrases_pixels_and_tokens_survive_the_pipeline(small, tokenizer):
    path, expected = small
    got = collect(preprocess(read_split(path, "train"), IDENTITY, tokenizer))
    train = {k: e for k, e in expected.items() if e.split == "train"}
    assert sorted(got["id"]) == sorted(train)  # every sample, once
    for i, sample_id in enumerate(got["id"]):
        exp = train[sample_id]
        assert got["phrase"][i] == exp.phrase
        np.testing.assert_array_equal(unpacked([got["mask"][i]], [got["width"][i]])[0], exp.mask)
        np.testing.assert_array_equal(got["image"][i].numpy(), exp.image)
        ids = tokenizer([exp.phrase], padding="max_length", truncation=True, max_length=8, return_tensors="np")["input_ids"][0]
        np.testing.assert_array_equal(got["input_ids"][i].numpy(), ids)
        assert got["attention_mask"][i].sum().item() == min(len(exp.phrase.split()), 8)


def test_limit_takes_the_same_first_samples_every_time(small):
    path, _ = small
    for seed in (None, 5):
        ids = [row["id"] for row in read_split(path, "train", limit=3, shuffle_seed=seed).take_all()]
        assert sorted(ids, key=int) == ["0", "1", "2"]
    assert split_size(path, "train", limit=3) == 3 and split_size(path, "train") == 7


def test_missing_and_unprepared_splits_are_clear_errors(small, tmp_path):
    path, _ = small
    with pytest.raises(DatasetError, match=r"split 'testA' is not in the prepared dataset .*it has: train, val, test"):
        read_split(path, "testA")
    with pytest.raises(DatasetError, match=r"manifest\.json is missing.*rsrefseg prepare"):
        read_split(tmp_path, "train")


def test_shuffle_phrases_permutes_across_the_whole_split(small, tokenizer):
    path, expected = small
    run = lambda seed: collect(preprocess(read_split(path, "train"), IDENTITY, tokenizer, shuffle_phrases=True, seed=seed, batch_size=2))
    first, again, other = run(0), run(0), run(1)
    given = dict(zip(first["id"], first["phrase"]))
    truth = {k: e.phrase for k, e in expected.items() if e.split == "train"}
    assert given == dict(zip(again["id"], again["phrase"]))  # deterministic in the seed
    assert given != dict(zip(other["id"], other["phrase"]))
    assert sorted(given.values()) == sorted(truth.values())  # the same phrases, moved
    assert all(given[k] != truth[k] for k in truth)  # no sample keeps its own (phrases are distinct)
    # computed over the split, not per batch of 2
    ids = sorted(truth, key=int)
    assert given == shuffled_phrases(ids, [truth[i] for i in ids], seed=0)
    # the image and mask still belong to the id
    for i, sample_id in enumerate(first["id"]):
        np.testing.assert_array_equal(first["image"][i].numpy(), expected[sample_id].image)


def test_shuffle_phrases_within_a_limited_split(small, tokenizer):
    path, expected = small
    got = collect(preprocess(read_split(path, "train", limit=4), IDENTITY, tokenizer, shuffle_phrases=True, seed=3))
    assert sorted(got["id"], key=int) == ["0", "1", "2", "3"]
    assert sorted(got["phrase"]) == sorted(expected[i].phrase for i in ("0", "1", "2", "3"))
    assert all(p != expected[i].phrase for i, p in zip(got["id"], got["phrase"]))


def _consume_in_threads(shards, batch_size: int, shuffle_seed=None) -> list[list[str]]:
    """Each shard's ids, the shards consumed side by side (as the train workers do)."""
    seen: list[list[str]] = [[] for _ in shards]
    errors = []

    def consume(rank: int) -> None:
        try:
            for batch in iter_batches(shards[rank], batch_size, shuffle_seed=shuffle_seed):
                seen[rank].extend(batch["id"])
        except Exception as exc:  # surfaced below; a thread would swallow it
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return seen


def test_streaming_split_feeds_two_consumers_every_sample_once_per_epoch(prepared_synthetic, tokenizer):
    sizes = InputSizes(sam_image=32, siglip_image=16, label=64, max_text_len=8)
    ds = preprocess(read_split(prepared_synthetic, "train", shuffle_seed=0), sizes, tokenizer)
    shards = ds.streaming_split(2, equal=True)
    for epoch in range(2):
        seen = _consume_in_threads(shards, 4, shuffle_seed=epoch)
        everything = seen[0] + seen[1]
        assert len(everything) == len(set(everything)) == 24, epoch  # 24 train samples, no repeats
        assert len(seen[0]) == len(seen[1]) == 12


def test_the_train_workers_streams_run_without_reservations_under_their_cap(prepared_synthetic, tokenizer, monkeypatch):
    # What Ray Train hands each worker (training.ingest): a split of a stream that keeps the
    # object-store cap read_split put on it, runs without Ray Data's per-operator reservations,
    # and still gives every sample once (train split evened out, validation whole).
    from ray.data import Dataset

    from rsrefseg.training.ingest import ExactEvalDataConfig

    split_from, real_split = [], Dataset.streaming_split

    def spy(self, *args, **kwargs):
        split_from.append(self)
        return real_split(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "streaming_split", spy)
    sizes = InputSizes(sam_image=32, siglip_image=16, label=64, max_text_len=8)
    cap = 300 << 20
    datasets = {name: preprocess(read_split(prepared_synthetic, name, buffer_bytes=cap), sizes, tokenizer)
                for name in ("train", "val")}
    splits = ExactEvalDataConfig(split_equal=["train"], enable_shard_locality=False).configure(datasets, 2, None, None)
    assert len(split_from) == 2
    for ds in split_from:
        assert ds.context.op_resource_reservation_enabled is False
        assert ds.context.execution_options.resource_limits.object_store_memory == cap
    for name in ("train", "val"):
        seen = _consume_in_threads([splits[0][name], splits[1][name]], 4)
        everything = seen[0] + seen[1]
        assert len(everything) == len(set(everything)) == split_size(prepared_synthetic, name), name
        if name == "train":
            assert len(seen[0]) == len(seen[1])


def test_iter_batches_shuffles_a_data_iterator(small, tokenizer):
    path, _ = small
    ds = preprocess(read_split(path, "train"), IDENTITY, tokenizer)
    iterator = ds.iterator()  # the type ray.train.get_dataset_shard returns
    order = lambda seed: [i for b in iter_batches(iterator, 2, shuffle_seed=seed) for i in b["id"]]
    plain = [i for b in iter_batches(iterator, 2) for i in b["id"]]
    shuffled = [order(seed) for seed in (1, 2, 3)]
    assert all(sorted(s) == sorted(plain) for s in shuffled)
    assert any(s != plain for s in shuffled)
    dropped = [len(b["id"]) for b in iter_batches(ds, 3, drop_last=True)]
    assert dropped == [3, 3]


def test_iter_batches_moves_tensors_to_the_requested_device(small, tokenizer):
    path, _ = small
    ds = preprocess(read_split(path, "val"), IDENTITY, tokenizer)
    batch = next(iter_batches(ds, 2, device="cpu"))
    assert batch["image"].device.type == "cpu" and isinstance(batch["id"], list)
    batch = next(iter_batches(ds, 2, device="auto"))  # outside Ray Train: CPU
    assert batch["mask"].device.type == "cpu"
    # A device other than the CPU is honoured (the meta device stands in for a GPU here).
    batch = next(iter_batches(ds, 2, device="meta"))
    assert {batch[k].device.type for k in ("image", "input_ids", "mask")} == {"meta"}
    assert isinstance(batch["phrase"], list)


def test_each_shard_is_read_and_preprocessed_in_one_task(small, tokenizer):
    # Fused: the raw rows never enter the object store, and no read task can hold a CPU while it
    # waits for separate map tasks to drain its output (that stalled evaluation with one ingest CPU).
    path, _ = small
    ds = preprocess(read_split(path, "train"), IDENTITY, tokenizer)
    assert sum(len(b["id"]) for b in iter_batches(ds, 4)) == 7
    stats = ds.stats()
    assert "ReadParquet->MapBatches(Preprocessor)" in stats and "4 tasks executed" in stats  # 7 rows, 2 a shard


def test_tokenize_without_an_attention_mask_falls_back_to_ones():
    class IdsOnly:
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            return {"input_ids": np.full((len(texts), max_length), 7)}

    ids, mask = tokenize(IdsOnly(), ["a", "b"], 5)
    assert ids.dtype == np.int64 and ids.shape == (2, 5)
    np.testing.assert_array_equal(mask, np.ones((2, 5)))


def test_device_side_preprocessing_of_the_stream_equals_the_cpu_reference(synthetic_root, prepared_synthetic, tokenizer):
    # What the model gets now (pixels as stored, resized on the device) against what it got when
    # the CPU map tasks resized with Pillow, at RSRefSeg-b's sizes.
    from rsrefseg.datasets.pipeline import resize_image, resize_mask
    from rsrefseg.datasets.synthetic import read_synthetic
    from rsrefseg.models.device_inputs import model_batch

    sizes = InputSizes(sam_image=1024, siglip_image=384, label=160, max_text_len=8)
    source = {t.id: t for t in read_synthetic(synthetic_root)}
    batch = next(iter_batches(preprocess(read_split(prepared_synthetic, "val", limit=2), sizes, tokenizer), 2))
    got = model_batch(batch, sizes, "cpu", originals=True)
    for k in range(2):
        image, mask = source[batch["id"][k]].load_image(), source[batch["id"][k]].load_mask()
        for name, size in (("sam_image", 1024), ("siglip_image", 384)):
            assert np.abs(got[name][k].numpy().astype(int) - resize_image(image, size)).max() <= 1, name
        np.testing.assert_array_equal(got["mask"][k].numpy(), resize_mask(mask, 160))
        np.testing.assert_array_equal(got["mask_original"][k].numpy(), mask)


def test_images_of_different_sizes_stream_and_are_resized_each_to_the_model(tmp_path, tokenizer):
    # RRSIS-D as downloaded has an odd-sized image among the 40x48 ones: batches mix sizes.
    from rsrefseg.models.device_inputs import model_batch

    expected = make_rrsisd(tmp_path / "src", odd_sized=True)
    prepare_dataset("rrsisd", tmp_path / "src", tmp_path / "out")
    sizes = InputSizes(sam_image=64, siglip_image=32, label=16, max_text_len=8)
    seen = set()
    for split in ("train", "val", "test"):
        for batch in iter_batches(preprocess(read_split(tmp_path / "out", split), sizes, tokenizer, batch_size=4), 4):
            got = model_batch(batch, sizes, "cpu", originals=True)
            assert got["sam_image"].shape[1:] == (3, 64, 64) and got["mask"].shape[1:] == (16, 16)
            for sample_id, mask in zip(got["id"], got["mask_original"]):
                np.testing.assert_array_equal(mask.numpy(), expected[sample_id].mask, err_msg=sample_id)
                seen.add(tuple(mask.shape))
    assert (34, 38) in seen and len(seen) == 2


def test_a_train_job_preprocesses_a_split_that_fits_once(prepared_synthetic, tmp_path):
    # data.cache_mib: what fits is decoded once, before training; every epoch then reads the kept
    # rows (the shards could be gone). What does not fit streams every epoch.
    import shutil

    from rsrefseg.inference.streams import build_datasets
    from tests.models.helpers import tiny_config

    data = tmp_path / "prepared"
    shutil.copytree(prepared_synthetic, data)
    cfg = tiny_config([f"data.path={data}", "data.augment=true"])
    cached = build_datasets(cfg, splits={"train": "train", "val": "val"}, epochs=True)
    streamed = build_datasets(cfg.replace({"data.cache_mib": 0}), splits={"train": "train"}, epochs=True)
    for shard in data.glob("**/*.parquet"):
        shard.unlink()
    first, second = (collect(cached["train"]) for _ in range(2))
    assert sorted(first["id"]) == sorted(second["id"]) and len(first["id"]) > 4
    assert len(collect(cached["val"])["id"]) > 0
    with pytest.raises(Exception):
        collect(streamed["train"])


def test_a_cached_split_keeps_its_read_order_whichever_task_finishes_first(small, tokenizer):
    # Training from a cached split is reproducible only if the cache holds the rows in read order:
    # the first shard's task is made the slowest, so completion order would put it last.
    import time

    path, _ = small
    first_shard = [r["phrase"] for r in read_split(path, "train", limit=2).take_all()]
    in_order = [r["id"] for r in sorted(read_split(path, "train").take_all(), key=lambda r: r["index"])]

    class SlowOnFirstShard:  # defined here, so Ray ships it by value
        def __init__(self, tokenizer, phrases):
            self.tokenizer, self.phrases = tokenizer, phrases

        def __call__(self, phrases, **kwargs):
            if list(phrases) == self.phrases:
                time.sleep(2.0)
            return self.tokenizer(phrases, **kwargs)

    ds = preprocess(read_split(path, "train"), IDENTITY, SlowOnFirstShard(tokenizer, first_shard), cache=True)
    assert len(in_order) == 7 and len(first_shard) == 2
    assert [r["id"] for r in ds.iter_rows()] == in_order


@pytest.mark.parametrize("shapes, stacked", [
    ([(4, 5, 3)] * 3, True),
    ([(4, 5, 3), (4, 5, 3), (4, 6, 3)], False),  # the last differs: the rows so far were in the batch
    ([(6, 5, 3), (4, 5, 3), (4, 5, 3)], False),
    ([(4, 5, 3), (4, 6, 3), (4, 5, 3)], False),  # ragged on the second axis only
    ([], False),
])
def test_decoded_images_are_copied_into_one_batch_or_kept_each(shapes, stacked):
    images = [np.full(shape, k, dtype=np.uint8) for k, shape in enumerate(shapes)]
    out = _stacked(iter(images), len(images))  # an iterator: decoded one at a time
    assert (out.dtype == np.uint8) == stacked and len(out) == len(images)
    for got, image in zip(out, images):
        np.testing.assert_array_equal(got, image)


def test_jpegs_decoded_on_the_device_give_the_model_inputs_of_the_cpu_pipeline(tmp_path, tokenizer):
    # data.decode: gpu. JPEG rows travel as their files and model_batch decodes them, batched, on
    # its device; raw rows (a grey JPEG the reader made RGB) and odd sizes mix in the batches.
    # On a CPU the decoder is libjpeg-turbo either way: the same inputs to the bit. nvJPEG's IDCT
    # and upsampling differ, hence a tolerance on a GPU (a guess until measured on one).
    from PIL import Image

    from rsrefseg.models.device_inputs import model_batch

    from .conftest import rrsisd_paths

    make_rrsisd(tmp_path / "src", odd_sized=True)
    grey = rrsisd_paths(tmp_path / "src", "download")[2] / "00001.jpg"
    with Image.open(grey) as im:
        im.convert("L").save(grey, quality=95)
    prepare_dataset("rrsisd", tmp_path / "src", tmp_path / "out")
    sizes = InputSizes(sam_image=64, siglip_image=32, label=16, max_text_len=8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got, files = {}, 0
    for decode in ("cpu", "gpu"):
        for split in ("train", "val", "test"):
            for batch in iter_batches(preprocess(read_split(tmp_path / "out", split), sizes, tokenizer, decode=decode), 4):
                files += sum(len(f) > 0 for f in batch.get("jpeg", []))
                inputs = model_batch(batch, sizes, device, originals=True)
                for k, sample in enumerate(inputs["id"]):
                    got.setdefault(sample, {})[decode] = {name: inputs[name][k].cpu().int() for name in
                                                          ("sam_image", "siglip_image", "mask", "mask_original")}
    assert files == len(got) - 1  # every sample but the raw one travelled as its file
    for sample, by_decode in got.items():
        cpu, gpu = by_decode["cpu"], by_decode["gpu"]
        for name in ("mask", "mask_original"):
            torch.testing.assert_close(gpu[name], cpu[name], rtol=0, atol=0)
        for name in ("sam_image", "siglip_image"):
            diff = (gpu[name] - cpu[name]).abs().float()
            if device == "cpu":
                assert diff.max() == 0, (sample, name)
            else:
                assert diff.max() <= 16 and diff.mean() <= 1.5, (sample, name, diff.max(), diff.mean())
