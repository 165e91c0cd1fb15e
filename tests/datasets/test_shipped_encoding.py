"""Images stored as shipped: a JPEG or PNG source keeps its bytes in the shard, decoded by the
pipeline's CPU tasks; raw stays for raw sources; shards without the `encoding` column still read."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rsrefseg.datasets import prepare as prepare_module
from rsrefseg.datasets import shard_codec
from rsrefseg.datasets.pipeline import Preprocessor
from rsrefseg.datasets.prepare import prepare_dataset
from rsrefseg.datasets.shard_codec import decode_images, shipped_bytes
from rsrefseg.datasets.triplet import DatasetError
from rsrefseg.models.sizes import InputSizes
from rsrefseg.platform.config import Config
from rsrefseg.platform.errors import ConfigError

from .conftest import make_rrsisd, rrsisd_paths

LARGE = InputSizes(sam_image=1024, siglip_image=384, label=512, max_text_len=8)


def photograph(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Something like an aerial photograph: smooth fields of colour with fine texture on top."""
    coarse = rng.normal(128, 40, (h // 32 + 2, w // 32 + 2, 3)).clip(0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    stripes = 12 * np.sin(xs / 5.0 + 3 * np.sin(ys / 40.0))[..., None]
    texture = rng.normal(0, 6, (h, w, 1))
    return (smooth + stripes + texture).clip(0, 255).astype(np.uint8)


def rrsisd_photographs(root: Path, size: int = 800) -> list[Path]:
    """make_rrsisd's layout with its JPEGs replaced by photographs at quality 90."""
    make_rrsisd(root, size=(size, size))
    _, _, image_dir = rrsisd_paths(root, "download")
    rng = np.random.default_rng(3)
    files = sorted(image_dir.glob("*.jpg"))
    for path in files:
        Image.fromarray(photograph(rng, size, size)).save(path, quality=90)
    return files


def read_table(out: Path, split: str):
    manifest = json.loads((out / "manifest.json").read_text())
    return pq.ParquetFile(out / manifest["shards"][split][0]["path"]).read()


def shard_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*.parquet"))


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("rrsisd_photos")
    files = rrsisd_photographs(root)
    out = root / "prepared"
    prepare_dataset("rrsisd", root, out)
    return out, files


def test_jpeg_shards_are_about_the_size_of_the_files(jpeg_dataset):
    out, files = jpeg_dataset
    source = sum(p.stat().st_size for p in files)
    assert shard_bytes(out) <= 1.2 * source, (shard_bytes(out), source)
    table = read_table(out, "train")
    assert set(table.column("encoding").to_pylist()) == {"jpeg"}


def test_the_shard_holds_the_files_bytes(jpeg_dataset):
    out, files = jpeg_dataset
    by_name = {p.read_bytes() for p in files}
    table = read_table(out, "train")
    assert all(data in by_name for data in table.column("image").to_pylist())


def test_preprocess_decodes_the_pixels_the_file_holds(jpeg_dataset, tokenizer):
    out, files = jpeg_dataset
    table = read_table(out, "train")
    batch = Preprocessor(sizes=LARGE, tokenizer=tokenizer)(table)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (len(table), 800, 800, 3)  # one array, not a list
    names = {f"{int(p.stem)}_0": p for p in files}
    for image, sample in zip(batch["image"], batch["id"]):
        with Image.open(names[sample]) as im:
            assert np.array_equal(image, np.asarray(im.convert("RGB")))


def encoded(image: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("save", [
    dict(format="JPEG", quality=90),  # 4:2:0, RRSIS-D's kind
    dict(format="JPEG", quality=75, subsampling=0),  # 4:4:4
    dict(format="JPEG", quality=95, subsampling=1),  # 4:2:2
    dict(format="JPEG", quality=85, progressive=True),
    dict(format="JPEG", quality=90, optimize=True, restart_marker_blocks=2),
    dict(format="PNG", compress_level=1),
    dict(format="PNG", compress_level=9),
], ids=lambda save: "-".join(f"{k}{v}" for k, v in save.items()))
def test_shipped_rows_decode_to_the_pixels_pillow_gives(save):
    # The read side decodes full-size JPEG and PNG rows with torchvision; what the model sees is
    # still Pillow's decoding of the file, to the last bit, on odd sizes (partial MCUs) too.
    rng = np.random.default_rng(0)
    for height, width in ((37, 53), (800, 800)):
        data = encoded(photograph(rng, height, width), **save)
        with Image.open(io.BytesIO(data)) as im:
            expected = np.asarray(im)
        (got,) = decode_images([data], [save["format"].lower()], [(height, width, 3)], ["x"], max_side=1024)
        assert got.dtype == np.uint8 and got.shape == (height, width, 3)
        np.testing.assert_array_equal(got, expected)


def test_what_torchvision_does_not_give_as_8_bit_rgb_decodes_with_pillow(monkeypatch):
    data = encoded(photograph(np.random.default_rng(1), 40, 48), format="JPEG", quality=90)
    monkeypatch.setattr(shard_codec, "_torch_decoded", lambda data, image_format, shape: None)
    (got,) = decode_images([data], ["jpeg"], [(40, 48, 3)], ["x"], max_side=1024)
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(got, np.asarray(im))


def test_prepare_keeps_a_files_bytes_only_when_the_read_side_decodes_them_exactly(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    path.write_bytes(encoded(photograph(np.random.default_rng(2), 40, 48), format="JPEG", quality=90))
    with Image.open(path) as im:
        image = np.asarray(im)
    assert shipped_bytes(str(path), image) == (path.read_bytes(), "jpeg")
    decoded = shard_codec._torch_decoded
    monkeypatch.setattr(shard_codec, "_torch_decoded", lambda *args: decoded(*args) ^ 1)  # a decoder one bit off
    assert shipped_bytes(str(path), image) is None  # stored raw: a shard never decodes to other pixels


def test_a_jpeg_larger_than_the_model_input_decodes_at_reduced_size(jpeg_dataset, tokenizer):
    out, _ = jpeg_dataset
    table = read_table(out, "train")
    small = InputSizes(sam_image=256, siglip_image=128, label=64, max_text_len=8)
    batch = Preprocessor(sizes=small, tokenizer=tokenizer)(table)
    assert batch["image"].shape == (len(table), 256, 256, 3)
    assert batch["mask"].shape == (len(table), 800, 100)  # masks stay at the image's size, packed
    # The DCT-scaled decode is the draft; the pipeline then shrinks it to the model's input.
    rows = decode_images(table.column("image").to_pylist(), ["jpeg"] * len(table), [(800, 800, 3)] * len(table),
                         ["x"] * len(table), max_side=256)
    assert {r.shape for r in rows} == {(400, 400, 3)}  # 1/2: the largest scale that stays >= 256


def test_content_hash_is_of_the_pixels_not_of_the_storage(tmp_path, monkeypatch):
    root = tmp_path / "src"
    make_rrsisd(root)
    prepare_dataset("rrsisd", root, tmp_path / "a")
    again = prepare_dataset("rrsisd", root, tmp_path / "b")
    monkeypatch.setattr(prepare_module, "shipped_bytes", lambda path, image: None)
    prepare_dataset("rrsisd", root, tmp_path / "raw")
    hashes = [json.loads((tmp_path / name / "manifest.json").read_text())["content_hash"] for name in ("a", "b", "raw")]
    assert hashes[0] == hashes[1] == hashes[2], (hashes, again)
    assert set(read_table(tmp_path / "raw", "train").column("encoding").to_pylist()) == {"raw"}


def test_raw_sources_stay_raw_and_grey_jpegs_are_stored_raw(tmp_path, prepared_synthetic, tokenizer):
    table = read_table(prepared_synthetic, "train")
    assert set(table.column("encoding").to_pylist()) == {"raw"}  # in-memory/TIFF sources
    root = tmp_path / "src"
    make_rrsisd(root)
    _, _, image_dir = rrsisd_paths(root, "download")
    grey = image_dir / "00001.jpg"
    with Image.open(grey) as im:
        im.convert("L").save(grey, quality=95)  # the reader makes it RGB: not the file's pixels
    prepare_dataset("rrsisd", root, tmp_path / "out")
    table = read_table(tmp_path / "out", "train")
    encodings = dict(zip(table.column("id").to_pylist(), table.column("encoding").to_pylist()))
    assert encodings["1_0"] == "raw" and encodings["2_0"] == "jpeg"
    batch = Preprocessor(sizes=LARGE, tokenizer=tokenizer)(table)  # a batch of both encodings
    with Image.open(grey) as im:
        assert np.array_equal(batch["image"][list(batch["id"]).index("1_0")], np.asarray(im.convert("RGB")))


def test_shards_without_the_encoding_column_read_as_raw(prepared_synthetic, tokenizer):
    table = read_table(prepared_synthetic, "train")
    old = table.drop_columns(["encoding"])
    small = InputSizes(sam_image=64, siglip_image=32, label=32, max_text_len=8)
    new_batch = Preprocessor(sizes=small, tokenizer=tokenizer)(table)
    old_batch = Preprocessor(sizes=small, tokenizer=tokenizer)(old)
    assert np.array_equal(np.stack(list(new_batch["image"])), np.stack(list(old_batch["image"])))


def test_a_damaged_or_unknown_encoding_fails_with_the_fix(jpeg_dataset, tokenizer):
    out, _ = jpeg_dataset
    table = read_table(out, "train")
    unknown = table.set_column(table.schema.get_field_index("encoding"), "encoding",
                               pc.replace_substring(table.column("encoding"), "jpeg", "webp"))
    with pytest.raises(DatasetError, match=r"unknown encoding 'webp'.*rsrefseg prepare"):
        Preprocessor(sizes=LARGE, tokenizer=tokenizer)(unknown)
    with pytest.raises(DatasetError, match=r"cannot decode.*rsrefseg prepare"):
        decode_images([b"\xff\xd8 not a jpeg"], ["jpeg"], [(800, 800, 3)], ["image of '1_0'"], max_side=1024)
    whole = table.column("image").to_pylist()[0]
    with pytest.raises(DatasetError, match=r"cannot decode.*rsrefseg prepare"):  # cut short: no half-grey image
        decode_images([whole[: len(whole) // 2]], ["jpeg"], [(800, 800, 3)], ["x"], max_side=1024)
    with pytest.raises(DatasetError, match=r"800x800 where the shard says 400x800"):
        decode_images(table.column("image").to_pylist()[:1], ["jpeg"], [(800, 400, 3)], ["x"], max_side=1024)


def test_decode_config_key():
    assert Config.from_dict({}).data.decode == "cpu"
    assert Config.from_dict({"data": {"decode": "gpu"}}).data.decode == "gpu"
    with pytest.raises(ConfigError, match=r"data.decode"):
        Config.from_dict({"data": {"decode": "tpu"}})


def test_decode_gpu_leaves_the_jpeg_files_the_device_can_decode_whole(jpeg_dataset, tokenizer):
    out, _ = jpeg_dataset
    table = read_table(out, "train")
    batch = Preprocessor(sizes=LARGE, tokenizer=tokenizer, decode="gpu")(table)
    assert batch["image"].shape == (len(table), 0, 0, 3)  # nothing decoded here
    assert list(batch["jpeg"]) == table.column("image").to_pylist()  # the files' own bytes
    assert "jpeg" not in Preprocessor(sizes=LARGE, tokenizer=tokenizer)(table)  # decode="cpu": as before
    # Larger than the SAM input: drafted and shrunk here, as with decode="cpu" (the device would
    # decode them whole, which is other pixels).
    small = InputSizes(sam_image=256, siglip_image=128, label=64, max_text_len=8)
    shrunk = Preprocessor(sizes=small, tokenizer=tokenizer, decode="gpu")(table)
    assert shrunk["image"].shape == (len(table), 256, 256, 3) and set(shrunk["jpeg"]) == {b""}
    np.testing.assert_array_equal(shrunk["image"], Preprocessor(sizes=small, tokenizer=tokenizer)(table)["image"])
    with pytest.raises(ValueError, match="decode must be one of cpu, gpu"):
        Preprocessor(sizes=LARGE, tokenizer=tokenizer, decode="tpu")


def test_decode_gpu_checks_the_header_before_a_file_leaves(jpeg_dataset, tokenizer):
    out, _ = jpeg_dataset
    table = read_table(out, "train").slice(0, 1)
    lying = table.set_column(table.schema.get_field_index("width"), "width", pa.array([400], table.schema.field("width").type))
    with pytest.raises(DatasetError, match=r"800x800 where the shard says 400x800"):
        Preprocessor(sizes=LARGE, tokenizer=tokenizer, decode="gpu")(lying)
