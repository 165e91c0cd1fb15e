"""Prepared datasets in object storage, against a real S3 API on loopback (moto's server, IAM
authentication on; tests/s3.py): `prepare --out s3://...` streams the shards to the bucket and
publishes them by writing manifest.json last, with the manifest a local prepare writes; Ray
Data's read tasks stream the shards back from the store; a reader never sees half a dataset;
bad storage fails before anything is decoded, naming the URI and what S3 answered.
"""

from __future__ import annotations

import json

import pytest

import rsrefseg.datasets.prepare as prepare_module
from rsrefseg.cli import main
from rsrefseg.datasets.prepare import MANIFEST, load_manifest, prepare_dataset
from rsrefseg.datasets.triplet import DatasetError
from rsrefseg.platform.storage import StorageError

ROWS_PER_SHARD = 8  # as `prepared_synthetic` (datasets/conftest.py): several shards per split


def expected_keys(manifest: dict, prefix: str) -> list[str]:
    """The objects a published dataset at `prefix` consists of: its shards and its manifest."""
    shards = [s["path"] for split in manifest["shards"].values() for s in split]
    return sorted(f"{prefix}/{name}" for name in [*shards, MANIFEST])


def unversioned(manifest: dict) -> dict:
    """The manifest without its shards' version prefix (`v-TIME-RANDOM/`): what two prepares of the
    same samples with the same settings share, wherever they publish."""
    shards = {split: [{**s, "path": s["path"].split("/", 1)[1]} for s in listed]
              for split, listed in manifest["shards"].items()}
    return {**manifest, "shards": shards}


def objects(s3, bucket: str) -> list[str]:
    """The bucket's objects, without pyarrow's empty "folder/" markers (pyarrow's S3 filesystem
    writes one where a delete empties a folder: the write probe's, in a fresh prefix)."""
    keys = s3.keys(bucket)
    markers = [k for k in keys if k.endswith("/")]
    assert all(s3.read(bucket, k) == b"" for k in markers), markers
    return [k for k in keys if not k.endswith("/")]


def shard_count(manifest: dict) -> int:
    return sum(len(split) for split in manifest["shards"].values())


@pytest.fixture
def nothing_decoded(monkeypatch):
    """Fail the test if prepare gets as far as reading the raw dataset."""

    def refuse(*args, **kwargs):
        raise AssertionError("prepare read the dataset before checking its output")

    monkeypatch.setitem(prepare_module.READERS, "synthetic", refuse)


class Outage:
    """Breaks the upload as the second shard starts, as a dropped connection would, once armed."""

    def __init__(self):
        self.armed = False
        self.opened: list[str] = []  # the shards opened while armed


@pytest.fixture
def outage(monkeypatch) -> Outage:
    real, state = prepare_module._open_shard, Outage()

    def open_shard(target, path):
        if state.armed:
            state.opened.append(path)
            if len(state.opened) > 1:
                raise OSError(f"When uploading part for key '{path}': AWS Error NETWORK_CONNECTION during UploadPart "
                              "operation: Connection reset by peer")
        return real(target, path)

    monkeypatch.setattr(prepare_module, "_open_shard", open_shard)
    return state


@pytest.fixture(scope="module")
def s3_prepared(s3_server, synthetic_root) -> tuple[str, str]:
    """The synthetic set prepared into a bucket of its own, as `prepared_synthetic` is locally:
    (its URI, the bucket). Tests read it and never change it."""
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/prepared"
    prepare_dataset("synthetic", synthetic_root, uri, rows_per_shard=ROWS_PER_SHARD)
    return uri, bucket


# --------------------------------------------------------------------------------------------
# Publishing


def test_cli_prepare_to_s3_writes_the_manifest_a_local_prepare_writes(s3_server, s3_bucket, synthetic_root, tmp_path,
                                                                      prepared_synthetic, monkeypatch, capsys):
    local = tmp_path / "local"
    assert main(["prepare", "--format", "synthetic", "--root", str(synthetic_root), "--out", str(local)]) == 0

    def no_local_publishing(*args):
        raise AssertionError("a remote prepare published through the local folder path")

    monkeypatch.setattr(prepare_module, "_publish_local", no_local_publishing)
    uri = f"s3://{s3_bucket}/data/synthetic/prepared"
    assert main(["prepare", "--format", "synthetic", "--root", str(synthetic_root), "--out", uri]) == 0
    assert f"prepared {uri}: train" in capsys.readouterr().out

    remote_text = s3_server.client().get_object(Bucket=s3_bucket, Key=f"data/synthetic/prepared/{MANIFEST}")["Body"].read()
    # Same counts, shards, source, encoding, content hash; only the version prefix differs.
    assert remote_text.decode() == json.dumps(load_manifest(uri), indent=2) + "\n"
    assert unversioned(load_manifest(uri)) == unversioned(load_manifest(local))
    # The content hash is of the samples, not of the shard layout: equal to a prepare with other shards.
    assert load_manifest(uri)["content_hash"] == load_manifest(prepared_synthetic)["content_hash"]
    # Exactly the shards and the manifest: no probe object, no staging leftovers.
    assert objects(s3_server, s3_bucket) == expected_keys(load_manifest(uri), "data/synthetic/prepared")


def test_prepare_to_s3_publishes_exactly_the_shards_and_the_local_manifest(s3_server, s3_prepared, prepared_synthetic):
    uri, bucket = s3_prepared
    manifest = load_manifest(uri)
    assert unversioned(manifest) == unversioned(load_manifest(prepared_synthetic))  # every field, shards included
    assert shard_count(manifest) > 3
    assert objects(s3_server, bucket) == expected_keys(manifest, "prepared")


def test_read_split_streams_the_shards_from_s3_through_ray_data(ray_session, s3_prepared, prepared_synthetic, monkeypatch):
    import pyarrow.fs
    import ray.data

    from rsrefseg.datasets.pipeline import read_split, split_size

    uri, bucket = s3_prepared
    manifest = load_manifest(uri)

    calls = []
    real = ray.data.read_parquet

    def spy(paths, **kwargs):
        calls.append((paths, kwargs.get("filesystem")))
        return real(paths, **kwargs)

    monkeypatch.setattr(ray.data, "read_parquet", spy)
    for split in ("train", "test"):
        remote = sorted(read_split(uri, split).take_all(), key=lambda r: r["index"])
        local = sorted(read_split(prepared_synthetic, split).take_all(), key=lambda r: r["index"])
        assert [r["id"] for r in remote] == [r["id"] for r in local] and remote
        for a, b in zip(remote, local):
            assert a.keys() == b.keys()
            assert all(a[k] == b[k] for k in a), a["id"]
        assert split_size(uri, split) == split_size(prepared_synthetic, split) == len(remote)
    # The read tasks got the store's filesystem and bucket/key paths (no local copy, no URI
    # for pyarrow to build another filesystem from).
    paths, filesystem = calls[0]
    assert isinstance(filesystem, pyarrow.fs.S3FileSystem)
    assert paths == [f"{bucket}/prepared/{s['path']}" for s in manifest["shards"]["train"]]

    limited = read_split(uri, "train", limit=3).take_all()
    assert sorted(r["index"] for r in limited) == [0, 1, 2] and split_size(uri, "train", limit=3) == 3


# --------------------------------------------------------------------------------------------
# Never half a dataset


def test_a_failed_upload_publishes_nothing_and_prepare_can_run_again(s3_server, s3_bucket, synthetic_root, outage):
    uri = f"s3://{s3_bucket}/prepared"
    outage.armed = True
    with pytest.raises(StorageError, match=rf"(?s)writing {uri} failed, nothing was published.*NETWORK_CONNECTION"):
        prepare_dataset("synthetic", synthetic_root, uri, rows_per_shard=ROWS_PER_SHARD)
    assert outage.opened == ["train/part-00000.parquet", "train/part-00001.parquet"]  # one shard went up
    # No manifest, so no reader takes the prefix for a dataset; and the uploaded shard is removed
    # again, so the prefix is not left "not a prepared dataset" for the retry to refuse.
    assert objects(s3_server, s3_bucket) == []
    with pytest.raises(DatasetError, match=rf"{uri} is not a prepared dataset: {uri}/manifest.json is missing"):
        load_manifest(uri)

    outage.armed = False  # the connection is back
    manifest = prepare_dataset("synthetic", synthetic_root, uri, rows_per_shard=ROWS_PER_SHARD)
    assert objects(s3_server, s3_bucket) == expected_keys(manifest, "prepared")


def test_a_failed_replacement_leaves_the_previous_dataset_published(s3_server, s3_bucket, synthetic_root, outage):
    uri = f"s3://{s3_bucket}/prepared"
    old = prepare_dataset("synthetic", synthetic_root, uri, rows_per_shard=ROWS_PER_SHARD)
    outage.armed = True
    with pytest.raises(StorageError, match="nothing was published"):
        prepare_dataset("synthetic", synthetic_root, uri, rows_per_shard=ROWS_PER_SHARD)
    # The new version's shard is removed again; the old manifest and its shards were never touched.
    assert objects(s3_server, s3_bucket) == expected_keys(old, "prepared")
    assert load_manifest(uri) == old


def test_replacing_keeps_the_old_version_published_until_the_new_manifest_then_deletes_it(s3_server, s3_bucket,
                                                                                           synthetic_root, monkeypatch):
    uri = f"s3://{s3_bucket}/prepared"
    old = prepare_dataset("synthetic", synthetic_root, uri, rows_per_shard=4)
    old_keys = expected_keys(old, "prepared")
    assert objects(s3_server, s3_bucket) == old_keys

    seen_at_first_shard = []
    real = prepare_module._open_shard

    def open_shard(target, path):
        if not seen_at_first_shard:  # besides the new version's resume journal (datasets.resume)
            seen_at_first_shard.append([k for k in objects(s3_server, s3_bucket) if "/.resume/" not in k])
        return real(target, path)

    monkeypatch.setattr(prepare_module, "_open_shard", open_shard)
    new = prepare_dataset("synthetic", synthetic_root, uri, rows_per_shard=16)
    # When the first new shard was written, the old dataset was still published, whole.
    assert seen_at_first_shard == [old_keys]
    # Published: the new manifest and exactly its shards; the old version deleted.
    assert shard_count(new) < shard_count(old)
    assert objects(s3_server, s3_bucket) == expected_keys(new, "prepared")
    assert load_manifest(uri) == new and new["content_hash"] == old["content_hash"]


def test_a_prefix_holding_other_objects_is_refused_and_kept(s3_server, s3_bucket, synthetic_root, nothing_decoded):
    s3_server.client().put_object(Bucket=s3_bucket, Key="prepared/thesis.tex", Body=b"precious")
    uri = f"s3://{s3_bucket}/prepared"
    with pytest.raises(DatasetError, match=rf"refusing to write to {uri}: .*not a prepared dataset \(no manifest.json\)"):
        prepare_dataset("synthetic", synthetic_root, uri)
    assert objects(s3_server, s3_bucket) == ["prepared/thesis.tex"]


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, before anything is decoded or written


@pytest.mark.parametrize("case", ["missing bucket", "read-only key"])
def test_prepare_to_unusable_storage_fails_first_naming_uri_and_answer(case, s3_server, s3_bucket, synthetic_root,
                                                                       monkeypatch, nothing_decoded, capsys):
    if case == "missing bucket":
        uri, said = "s3://no-such-bucket-rsr/data/prepared", ["NO_SUCH_BUCKET", "aws s3 mb s3://no-such-bucket-rsr"]
    else:
        for key, value in s3_server.env(s3_server.reader).items():
            monkeypatch.setenv(key, value)
        uri, said = f"s3://{s3_bucket}/data/prepared", ["ACCESS_DENIED", "no write permission"]
    assert main(["prepare", "--format", "synthetic", "--root", str(synthetic_root), "--out", uri]) == 2
    err = capsys.readouterr().err
    assert f"--out: cannot write under {uri}: S3 at {s3_server.endpoint} answered" in err
    assert all(text in err for text in said), err
    assert len(err.strip().splitlines()) == 1
    assert objects(s3_server, s3_bucket) == []


def test_reading_a_prefix_without_a_dataset_says_so_with_the_uri(ray_session, s3_bucket):
    from rsrefseg.datasets.pipeline import read_split, split_size

    uri = f"s3://{s3_bucket}/nothing-here"
    for read in (load_manifest, lambda u: read_split(u, "train"), lambda u: split_size(u, "train")):
        with pytest.raises(DatasetError, match=rf"{uri} is not a prepared dataset: {uri}/manifest.json is missing.*rsrefseg prepare"):
            read(uri)
    with pytest.raises(DatasetError, match=r"s3://no-such-bucket-rsr/x is not a prepared dataset: .*NO_SUCH_BUCKET"):
        load_manifest("s3://no-such-bucket-rsr/x")


def test_a_read_only_key_reads_a_published_dataset(s3_server, s3_prepared, prepared_synthetic, monkeypatch):
    uri, _ = s3_prepared
    for key, value in s3_server.env(s3_server.reader).items():
        monkeypatch.setenv(key, value)
    assert unversioned(load_manifest(uri)) == unversioned(load_manifest(prepared_synthetic))
