"""Where runs, datasets and artifacts live: a local folder or object storage (`s3://BUCKET/PREFIX`).

The one place a URI becomes a filesystem. Everything that reads or writes a run folder, a
prepared dataset or a checkpoint outside this machine gets its filesystem here, and Ray Train,
Ray Tune and Ray Data get the same `pyarrow.fs` object (it travels to their workers pickled with
its endpoint and region, never with credentials).

S3 is configured the way S3 users configure it, through the standard AWS settings, which
pyarrow, boto3 (MLflow's artifact store) and the AWS CLI all read:
- credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), a profile of
  ~/.aws/credentials or AWS_SHARED_CREDENTIALS_FILE (AWS_PROFILE), or the node's instance role;
- an S3-compatible store (MinIO, Ceph, on-prem): AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL;
- the region: AWS_REGION or AWS_DEFAULT_REGION (else the bucket's own, asked of AWS).
Credentials are never written anywhere by this project and never travel with a job: every node
has its own (as `cluster.yaml`'s instance profile gives them). The endpoint and region, which
are not secret, travel with submitted jobs (`forwarded_environment`).

`location(value)` is a `pathlib.Path` for a local value and a `RemotePath` for a URI: the few
Path operations run folders need (`/`, name, parent, is_file, read_text, write_text, glob ...),
so `platform.runs` keeps one code path. An object store has no rename, so a folder is published
by writing the file its readers look for last (a prepared dataset's manifest.json, a run's
rsrefseg_run.json); every single object is replaced atomically by the store itself.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Union
from urllib.parse import urlparse

from rsrefseg.platform import atomic
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.paths import is_uri, redact

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# Not secret, and what a node needs to reach the same store the submitting machine reaches.
FORWARDED_ENVS = (*ENDPOINT_ENVS, *REGION_ENVS)
# S3 requests: fail a dead endpoint in seconds, retry a transient error a few times (pyarrow's
# default is 3 attempts) before an operation fails.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
RETRY_ATTEMPTS = 6
# The checks before a job (`check_writable`, `check_readable`) answer in a second or two: one
# retry of a transient error, not the backoff of six attempts (about 14 s against a dead endpoint).
PREFLIGHT_ATTEMPTS = 2
PROBE_PREFIX = ".rsrefseg-probe-"  # the files `probe_file` writes and removes


class StorageError(ConfigError):
    """A storage URI this machine cannot use: no credentials, no bucket, no endpoint, no write."""


def is_remote(value: Union[str, os.PathLike]) -> bool:
    """A URI of a store other than this machine's disk (s3://, gs://, ...; not file://)."""
    return is_uri(str(value)) and not str(value).startswith("file://")


def endpoint_url(environ=os.environ) -> str:
    """The S3 endpoint override of this environment ('' = AWS itself)."""
    return next((environ[k] for k in ENDPOINT_ENVS if environ.get(k)), "")


def forwarded_environment(environ=os.environ) -> dict[str, str]:
    """The S3 settings (endpoint, region; never credentials) a job's processes on other nodes need."""
    return {k: environ[k] for k in FORWARDED_ENVS if environ.get(k)}


def _split(uri: str, key: str = "") -> tuple[str, str]:
    """(scheme, bucket/key) of a URI, refusing what would put secrets or options in a URI."""
    parsed = urlparse(uri)
    where = f"{key}: {redact(uri)}" if key else redact(uri)
    if parsed.query or "@" in parsed.netloc:
        raise StorageError(
            f"{where}: give S3 options and credentials through the standard AWS variables (AWS_ENDPOINT_URL, "
            "AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), not in the URI: a URI is "
            "recorded in run folders and MLflow params"
        )
    if not parsed.netloc:
        raise StorageError(f"{where}: no bucket (expected s3://BUCKET/PREFIX)")
    return parsed.scheme, (parsed.netloc + parsed.path).rstrip("/")


def check_uri(key: str, value: str) -> None:
    """A config key's storage URI is well formed (a bucket, no options or credentials in it)."""
    if is_remote(value):
        _split(value, key)


def filesystem(uri: str, attempts: int = RETRY_ATTEMPTS):
    """(pyarrow filesystem, path inside it) for a URI: S3 from the standard AWS settings (each
    request tried up to `attempts` times), any other scheme pyarrow knows (gs://, hdfs://,
    file://) through pyarrow itself."""
    from pyarrow import fs

    scheme, inner = _split(uri)
    if scheme not in ("s3", "s3a"):
        return fs.FileSystem.from_uri(uri)
    options: dict = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
                     "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    endpoint = endpoint_url()
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=url.netloc + url.path.rstrip("/"), scheme=url.scheme or "https")
    region = next((os.environ[k] for k in REGION_ENVS if os.environ.get(k)), "")
    if not region and not endpoint:
        try:  # AWS itself answers with the bucket's region; an S3-compatible store has none
            region = fs.resolve_s3_region(inner.split("/", 1)[0])
        except OSError:
            region = ""  # the bucket is missing or unreachable: the request itself will say so
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options), inner


@dataclass(frozen=True, eq=False)
class RemotePath:
    """A file or folder in object storage, with the subset of `pathlib.Path` run folders use.

    `str()` gives the URI; `fs`/`path` what pyarrow (Ray Train, Ray Data) takes."""

    scheme: str
    path: str  # bucket/key, no trailing slash
    fs: object  # pyarrow.fs.FileSystem

    @classmethod
    def parse(cls, uri: str, attempts: int = RETRY_ATTEMPTS) -> "RemotePath":
        scheme, _ = _split(uri)
        filesystem_, inner = filesystem(uri, attempts)
        return cls(scheme, inner, filesystem_)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "RemotePath") -> bool:
        return str(self) < str(other)

    def __truediv__(self, part: Union[str, os.PathLike]) -> "RemotePath":
        return RemotePath(self.scheme, posixpath.normpath(f"{self.path}/{part}"), self.fs)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def bucket(self) -> "RemotePath":
        return RemotePath(self.scheme, self.path.split("/", 1)[0], self.fs)

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.scheme, posixpath.dirname(self.path) or self.path, self.fs)

    def resolve(self) -> "RemotePath":
        return self

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        if not isinstance(other, RemotePath) or not f"{self.path}/".startswith(f"{other.path}/"):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.path).relative_to(other.path)

    def _type(self):
        from pyarrow import fs

        return self.fs.get_file_info(self.path).type, fs.FileType

    def is_file(self) -> bool:
        kind, types = self._type()
        return kind == types.File

    def is_dir(self) -> bool:
        kind, types = self._type()
        return kind == types.Directory

    def exists(self) -> bool:
        kind, types = self._type()
        return kind != types.NotFound

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        # One object, replaced whole by the store: a reader sees the old version or the new one.
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Object stores have no folders: a prefix exists once something is written under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def iterdir(self) -> Iterator["RemotePath"]:
        from pyarrow import fs

        try:
            infos = self.fs.get_file_info(fs.FileSelector(self.path, recursive=False))
        except FileNotFoundError:
            return iter(())
        return iter(sorted((RemotePath(self.scheme, i.path, self.fs) for i in infos), key=str))

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Matches of a pattern of plain names and `*` segments (`*/rsrefseg_run.json`), one
        listing per level, never a listing of the whole prefix (which holds every checkpoint)."""
        found = [self]
        for part in pattern.split("/"):
            if any(c in part for c in "*?["):
                found = [child for folder in found for child in folder.iterdir() if fnmatch.fnmatch(child.name, part)]
            else:
                found = [p / part for p in found]
                found = [p for p in found if p.exists()]
        return iter(found)


Location = Union[Path, RemotePath]


def location(value: Union[str, os.PathLike, RemotePath]) -> Location:
    """A local Path, or a RemotePath for a URI."""
    if isinstance(value, (Path, RemotePath)):
        return value
    text = str(value)
    if text.startswith("file://"):
        return Path(urlparse(text).path)
    return RemotePath.parse(text) if is_uri(text) else Path(value)


def ray_storage(value: Union[str, Location]) -> dict:
    """Ray Train's / Ray Tune's RunConfig storage arguments for a storage location."""
    where = location(value)
    if isinstance(where, RemotePath):
        return {"storage_path": where.path, "storage_filesystem": where.fs}
    return {"storage_path": str(where)}


# -- copies between this machine and the store ------------------------------------------------------


def copy_dir(src: Union[str, os.PathLike], target: Location, *, last: str | None = None) -> Location:
    """Copy the local folder `src` to `target`, publishing it whole: a local folder is renamed
    into place (`atomic.copy_dir`); on an object store, which cannot rename a folder, the file
    `last` is written after the others, so a reader that looks for it finds the rest in place."""
    if not isinstance(target, RemotePath):
        return atomic.copy_dir(src, target)
    from pyarrow import fs

    src = Path(src)
    local = fs.LocalFileSystem()
    rest = [p for p in sorted(src.rglob("*")) if p.is_file() and p.relative_to(src).as_posix() != last]
    for path in rest + ([src / last] if last and (src / last).is_file() else []):
        fs.copy_files(str(path), f"{target.path}/{path.relative_to(src).as_posix()}",
                      source_filesystem=local, destination_filesystem=target.fs)
    return target


def local_copy(src: RemotePath, files: tuple[str, ...]) -> Path:
    """The named files of a remote folder, downloaded into a temporary folder of this process
    (removed when it exits): what code that reads local files (checkpoint loading) is given."""
    import atexit

    from pyarrow import fs

    folder = Path(tempfile.mkdtemp(prefix=f"rsrefseg-{src.name}-"))
    atexit.register(shutil.rmtree, folder, True)
    for name in files:  # streamed to disk: weights may not fit in memory twice
        fs.copy_files(f"{src.path}/{name}", str(folder / name),
                      source_filesystem=src.fs, destination_filesystem=fs.LocalFileSystem())
    return folder


# -- before any Ray resource: can this machine use the URI? -----------------------------------------

_AWS_ERROR = re.compile(r"AWS Error ([A-Z_]+)[^:]*:\s*(.*)", re.S)
ADVICE = {
    "NO_SUCH_BUCKET": "the bucket does not exist there: create it (aws s3 mb s3://{bucket}) or correct the URI",
    "ACCESS_DENIED": "the credentials found are refused for this prefix (no write permission, or wrong keys)",
    "INVALID_ACCESS_KEY_ID": "the access key is unknown to this store",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key",
    "NETWORK_CONNECTION": "no S3 endpoint answers there: check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)",
}


def describe(exc: BaseException, uri: str) -> str:
    """What S3 answered, in a line, with what to do about it."""
    text = str(exc).strip()
    match = _AWS_ERROR.search(text)
    code, said = (match.group(1), match.group(2).split(" (Request ID")[0].strip()) if match else ("", text)
    bucket = urlparse(uri).netloc.rsplit("@", 1)[-1]
    advice = ADVICE.get(code, "").format(bucket=bucket)
    where = redact(endpoint_url()) or "AWS"
    return f"S3 at {where} answered {code or type(exc).__name__}: {said}" + (f"; {advice}" if advice else "")


def has_credentials() -> bool:
    """Whether the standard AWS chain (variables, profile files, the instance role) finds any."""
    import botocore.session

    try:
        return botocore.session.Session().get_credentials() is not None
    except Exception:  # a broken profile file: let the request report it
        return True


def require_credentials(key: str, uri: str) -> None:
    if urlparse(uri).scheme in ("s3", "s3a") and not has_credentials():
        raise StorageError(
            f"{key}: {redact(uri)}: no AWS credentials found on this machine (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE with ~/.aws/credentials, or an instance role); every node of the "
            "cluster needs them too"
        )


@contextmanager
def probe_file(folder: Location, text: str = "rsrefseg") -> Iterator[Location]:
    """A file holding `text`, written under `folder` under a name of its own and removed when the
    `with` block ends: how a check learns that storage takes a write (`check_writable`) or is
    the same for every node (`shared_storage`)."""
    probe = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    probe.write_text(text)
    try:
        yield probe
    finally:
        probe.unlink(missing_ok=True)


def check_writable(key: str, uri: str) -> None:
    """Fail, naming the config key, the URI and what S3 answered, unless this machine can write
    under `uri` (a probe object is written and removed). Local paths pass: their own checks apply."""
    if not is_remote(uri):
        return
    require_credentials(key, uri)
    try:
        with probe_file(RemotePath.parse(uri, PREFLIGHT_ATTEMPTS)):
            pass
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{key}: cannot write under {redact(uri)}: {describe(exc, uri)}") from None


def missing_bucket(where: RemotePath) -> str:
    """What S3 answers, with what to do, when `where`'s bucket does not exist ('' when it does):
    to a read, a missing object and a missing bucket look alike (both are "not found")."""
    if where.bucket.exists():
        return ""
    advice = ADVICE["NO_SUCH_BUCKET"].format(bucket=where.bucket.name)
    return f"S3 at {redact(endpoint_url()) or 'AWS'} answered NO_SUCH_BUCKET: {advice}"


def check_readable(key: str, uri: str, name: str) -> None:
    """Fail, naming the key, the URI and what S3 answered, unless `uri/name` can be read here."""
    if not is_remote(uri):
        return
    require_credentials(key, uri)
    where = RemotePath.parse(uri, PREFLIGHT_ATTEMPTS)
    try:
        (where / name).read_bytes()
    except FileNotFoundError:
        answer = missing_bucket(where)
        if answer:
            raise StorageError(f"{key}: {where}: {answer}") from None
        return  # the caller says what was expected there
    except OSError as exc:
        raise StorageError(f"{key}: cannot read {redact(f'{uri}/{name}')}: {describe(exc, uri)}") from None
