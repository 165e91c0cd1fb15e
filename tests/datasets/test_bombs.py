"""Decompression bombs: memory stays bounded on any input. Sizes are read from headers (an image
file's, an RLE's `size`, an inline .npy mask's) and checked against `max_pixels` before anything
is decoded; the refusal names the file, the size found, the cap and how to raise it.

The bombs are built by hand at the byte level, so that creating one stays cheap: a TIFF whose
strips all point at one small zlib block of zeros, a PNG compressed row by row."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rsrefseg.datasets.imagefiles import DEFAULT_MAX_PIXELS, read_array
from rsrefseg.datasets.prepare import prepare_dataset
from rsrefseg.datasets.triplet import DatasetError

from .conftest import make_fiftyone, make_refsegrs, make_rrsisd

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _restore_pillow_limit(monkeypatch):
    """Pillow's limit is process-wide and a prepare may raise it: restore it after each test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def tiff_bomb(path: Path, height: int, width: int, *, samples: int = 3, rows_per_strip: int = 64) -> int:
    """A zlib-compressed 8-bit TIFF of zeros, every strip pointing at the same compressed block:
    a few KB on disk, height x width x samples bytes decoded (returned)."""
    assert height % rows_per_strip == 0
    block = zlib.compress(bytes(rows_per_strip * width * samples), 9)
    block += b"\0" * (len(block) % 2)
    strips = height // rows_per_strip
    offsets_at = 8 + len(block)
    counts_at = offsets_at + 4 * strips
    bits_at = counts_at + 4 * strips
    ifd_at = bits_at + 2 * samples + 2 * (samples % 2)
    short, long_ = 3, 4
    entries = [
        (256, long_, 1, width), (257, long_, 1, height),
        (258, short, samples, bits_at if samples > 2 else 8),
        (259, short, 1, 8),  # deflate
        (262, short, 1, 2 if samples == 3 else 1),  # RGB, or min-is-black
        (273, long_, strips, offsets_at), (277, short, 1, samples), (278, long_, 1, rows_per_strip),
        (279, long_, strips, counts_at), (284, short, 1, 1),
    ]
    data = b"II*\0" + struct.pack("<I", ifd_at) + block
    data += struct.pack(f"<{strips}I", *[8] * strips) + struct.pack(f"<{strips}I", *[len(block)] * strips)
    data += struct.pack(f"<{samples}H", *[8] * samples) + b"\0" * (2 * (samples % 2))
    data += struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    path.write_bytes(data)
    return height * width * samples


def png_bomb(path: Path, height: int, width: int, *, rows: int | None = None) -> int:
    """An 8-bit RGB PNG of zeros, compressed row by row (never held whole); with `rows`, only
    that many rows are stored (a header-level bomb). Returns the decoded bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + 3 * width)  # filter byte 0, then the pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return height * width * 3


def _assert_refused(message: str, path_part: str, size: str, cap: int = DEFAULT_MAX_PIXELS) -> None:
    assert path_part in message and size in message, message
    assert f"{cap:,}" in message and "--max-pixels" in message, message


# --------------------------------------------------------------------------------------------
# Image files: the header decides, before decoding


def test_tiff_bomb_is_refused_from_its_header(tmp_path):
    decoded = tiff_bomb(tmp_path / "bomb.tif", 24000, 24000)
    assert (tmp_path / "bomb.tif").stat().st_size < 64 * 1024 and decoded > 1.5 * 1024 * MiB
    with pytest.raises(DatasetError) as info:
        read_array(tmp_path / "bomb.tif", what="image", context="id '0'")
    _assert_refused(str(info.value), "bomb.tif (id '0')", "24000x24000")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_bombs_are_refused_from_their_header(tmp_path):
    # Within Pillow's default limit (it only warns up to 179 Mpx): decoded whole before.
    png_bomb(tmp_path / "real.png", 12000, 12000)
    # Past it: Pillow's own error (it counts the pixels), which read as "unreadable or truncated".
    png_bomb(tmp_path / "header.png", 40000, 40000, rows=2)
    for name, size in (("real.png", "12000x12000"), ("header.png", "1,600,000,000 pixels")):
        with pytest.raises(DatasetError) as info:
            read_array(tmp_path / name, what="mask")
        _assert_refused(str(info.value), name, size)


def test_the_cap_is_a_parameter_and_pillow_follows_it(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "small.png")
    tiff_bomb(tmp_path / "small.tif", 192, 300)
    for name in ("small.png", "small.tif"):
        height = 200 if name.endswith("png") else 192
        assert read_array(tmp_path / name, what="image", max_pixels=60_000).shape[:2] == (height, 300)
        with pytest.raises(DatasetError) as info:
            read_array(tmp_path / name, what="image", max_pixels=50_000)
        _assert_refused(str(info.value), name, "300x", cap=50_000)
    # A cap over Pillow's own limit is honoured (Pillow would refuse past 2 x its limit)...
    Image.MAX_IMAGE_PIXELS = 1000
    assert read_array(tmp_path / "small.png", what="image", max_pixels=60_000).shape == (200, 300, 3)
    assert Image.MAX_IMAGE_PIXELS == 60_000
    # ...and a smaller one never lowers Pillow's process-wide limit (other code's images).
    read_array(tmp_path / "small.png", what="image", max_pixels=100_000)
    read_array(tmp_path / "small.png", what="image", max_pixels=70_000)
    assert Image.MAX_IMAGE_PIXELS == 100_000


def test_pillow_s_own_bomb_error_reads_as_the_cap(tmp_path, monkeypatch):
    import rsrefseg.datasets.imagefiles as imagefiles

    png_bomb(tmp_path / "b.png", 4000, 4000, rows=1)
    monkeypatch.setattr(imagefiles, "allow_pillow", lambda max_pixels: None)
    Image.MAX_IMAGE_PIXELS = 1000
    with pytest.raises(DatasetError) as info:
        read_array(tmp_path / "b.png", what="image", max_pixels=5000)
    _assert_refused(str(info.value), "b.png", "16,000,000 pixels", cap=5000)


def test_prepare_refuses_a_bomb_names_it_and_takes_max_pixels(tmp_path):
    make_refsegrs(tmp_path / "rs")
    tiff_bomb(tmp_path / "rs" / "masks" / "3.tif", 12800, 12800, samples=1)  # 164 Mpx, 156 MiB
    with pytest.raises(DatasetError) as info:
        prepare_dataset("refsegrs", tmp_path / "rs", tmp_path / "out", workers=1)
    message = str(info.value)
    assert "output_phrase_train.txt:4: id '3'" in message, message
    _assert_refused(message, "3.tif", "12800x12800")
    # A skippable sample like any other bad file; the cap is prepare's max_pixels.
    manifest = prepare_dataset("refsegrs", tmp_path / "rs", tmp_path / "out", skip_invalid=True, workers=1, max_pixels=10_000)
    assert manifest["counts"] == {"train": 4, "val": 2, "test": 3}
    _assert_refused(manifest["skipped"][0]["reason"], "3.tif", "12800x12800", cap=10_000)


@pytest.mark.parametrize("max_pixels", [0, -1, 2.5, True])
def test_a_bad_cap_is_refused(tmp_path, max_pixels):
    make_refsegrs(tmp_path / "rs")
    with pytest.raises(DatasetError, match="max_pixels must be a positive"):
        prepare_dataset("refsegrs", tmp_path / "rs", tmp_path / "out", max_pixels=max_pixels)


# --------------------------------------------------------------------------------------------
# Peak memory: the prepare of a bomb, in a child process


CHILD = textwrap.dedent("""
    import resource, sys
    from rsrefseg.datasets.prepare import prepare_dataset
    from rsrefseg.datasets.triplet import DatasetError
    try:
        prepare_dataset(sys.argv[1], sys.argv[2], sys.argv[3], workers=2)
        print("PREPARED")
    except DatasetError as exc:
        print("REFUSED", exc)
    try:  # Linux: this process's own high-water mark (ru_maxrss would include the forked parent's)
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    print("PEAK_BYTES", peak)
""")


def _peak_of_prepare(fmt: str, root: Path, out: Path) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", CHILD, fmt, str(root), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(done.stdout.rsplit("PEAK_BYTES", 1)[1])
    return done.stdout, peak


def test_preparing_a_tiff_bomb_keeps_memory_far_below_its_decoded_size(tmp_path):
    make_refsegrs(tmp_path / "rs")
    decoded = tiff_bomb(tmp_path / "rs" / "images" / "0.tif", 24000, 24000)
    assert decoded > 1.5 * 1024 * MiB and (tmp_path / "rs" / "images" / "0.tif").stat().st_size < 64 * 1024
    output, peak = _peak_of_prepare("refsegrs", tmp_path / "rs", tmp_path / "out")
    assert "REFUSED" in output and "0.tif" in output and "24000x24000" in output and "--max-pixels" in output, output
    print(f"peak RSS {peak / MiB:.0f} MiB; the bomb decodes to {decoded / MiB:.0f} MiB")
    assert peak < 400 * MiB, f"peak RSS {peak / MiB:.0f} MiB"


def test_preparing_an_rle_bomb_keeps_memory_far_below_its_decoded_size(tmp_path):
    make_rrsisd(tmp_path / "R")
    _set_segmentation(tmp_path / "R", 2, [_zeros_rle(40000, 40000)])
    output, peak = _peak_of_prepare("rrsisd", tmp_path / "R", tmp_path / "out")
    assert "REFUSED" in output and "annotation 2" in output and "40000x40000" in output, output
    print(f"peak RSS {peak / MiB:.0f} MiB; the RLE decodes to {40000 * 40000 / MiB:.0f} MiB")
    assert peak < 400 * MiB, f"peak RSS {peak / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Masks that claim their size: RLEs (RRSIS-D), polygons, inline .npy (FiftyOne)


def _zeros_rle(height: int, width: int) -> dict:
    """A compressed RLE of an all-zero height x width mask, built without decoding it."""
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _set_segmentation(root: Path, ann_id: int, segmentation) -> None:
    path = root / "rrsisd" / "instances.json"
    data = json.loads(path.read_text())
    next(a for a in data["annotations"] if a["id"] == ann_id)["segmentation"] = segmentation
    path.write_text(json.dumps(data))


def _mask_error(root: Path, sample_id: str) -> str:
    from rsrefseg.datasets.rrsisd import read_rrsisd

    triplet = next(t for t in read_rrsisd(root) if t.id == sample_id)
    with pytest.raises(DatasetError) as info:
        triplet.load_mask()
    return str(info.value)


def test_an_rle_claiming_a_huge_size_is_refused_before_decoding(tmp_path):
    make_rrsisd(tmp_path)
    _set_segmentation(tmp_path, 2, [_zeros_rle(40000, 40000)])
    message = _mask_error(tmp_path, "2_0")
    assert "annotation 2" in message and "id '2_0'" in message, message
    _assert_refused(message, "instances.json", "40000x40000")


def test_an_rle_off_its_image_beyond_the_quirk_is_refused(tmp_path):
    # The fixture's images are 48x40; RRSIS-D's quirk is a mask a few pixels off its JPEG.
    make_rrsisd(tmp_path)
    _set_segmentation(tmp_path, 3, _zeros_rle(400, 480))
    message = _mask_error(tmp_path, "3_0")
    assert "annotation 3" in message and "480x400" in message and "48x40" in message, message
    _set_segmentation(tmp_path, 3, [_zeros_rle(40, 48), _zeros_rle(44, 48)])
    assert "differ in size" in _mask_error(tmp_path, "3_0")


def test_the_release_quirk_still_passes(tmp_path):
    # A JPEG a few pixels off its RLE (800x787 against 800x800 in the release): kept, fitted.
    make_rrsisd(tmp_path / "R", odd_sized=True, size=(96, 96))
    manifest = prepare_dataset("rrsisd", tmp_path / "R", tmp_path / "out", workers=1)
    assert manifest["counts"] == {"train": 3, "val": 1, "test": 3}
    assert len(manifest["warnings"]) == 1 and "resized" in manifest["warnings"][0]


def test_polygons_off_their_image_are_refused_before_rasterising(tmp_path):
    # pycocotools walks a polygon's outline in memory: 4 points at 4e7 took 6 GB.
    make_rrsisd(tmp_path)
    _set_segmentation(tmp_path, 5, [[0.0, 0.0, 4e7, 0.0, 4e7, 4e7, 0.0, 4e7]])
    message = _mask_error(tmp_path, "5_0")
    assert "annotation 5" in message and "outside the 48x40 image" in message, message
    zigzag = [float(v) for i in range(20000) for v in (0, i % 40, 47, i % 40)]
    _set_segmentation(tmp_path, 5, [zigzag])
    assert "outlines total" in _mask_error(tmp_path, "5_0")


def _npy_bomb(height: int, width: int) -> dict:
    """An inline FiftyOne mask: np.save bytes of a height x width uint8 zero mask, zlib-compressed
    by rows (never held whole), as extended JSON."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (height, width)})
    z = zlib.compressobj(9)
    row = bytes(width)
    data = z.compress(head.getvalue()) + b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return {"$binary": {"base64": base64.b64encode(data).decode(), "subType": "00"}}


def test_an_inline_mask_bomb_is_refused_from_its_npy_header(tmp_path):
    make_fiftyone(tmp_path / "fo")
    path = tmp_path / "fo" / "samples.json"
    data = json.loads(path.read_text())
    data["samples"][4]["segmentation"]["mask"] = _npy_bomb(20000, 20000)  # 400 MB inflated
    path.write_text(json.dumps(data))
    assert path.stat().st_size < 2 * MiB
    with pytest.raises(DatasetError) as info:
        prepare_dataset("fiftyone", tmp_path / "fo", tmp_path / "out", workers=1)
    _assert_refused(str(info.value), "samples.json[samples][4]", "20000x20000")


def test_the_prepare_command_takes_max_pixels(tmp_path, capsys):
    from rsrefseg import cli

    make_refsegrs(tmp_path / "rs")
    tiff_bomb(tmp_path / "rs" / "images" / "2.tif", 192, 320)  # 61,440 pixels, a plain image size
    args = ["prepare", "--format", "refsegrs", "--root", str(tmp_path / "rs"), "--out", str(tmp_path / "out")]
    assert cli.main(args + ["--max-pixels", "60000"]) == 2
    err = capsys.readouterr().err
    assert "2.tif" in err and "320x192" in err and "60,000" in err and "--max-pixels" in err, err
    assert cli.main(args + ["--max-pixels", "0"]) == 2
    assert "max_pixels must be a positive" in capsys.readouterr().err
    # Under a higher cap the image is read (then refused for its size against its mask, as before)
    assert cli.main(args + ["--max-pixels", "70000"]) == 2
    assert "is 320x192 but mask" in capsys.readouterr().err
