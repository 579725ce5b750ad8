"""Object storage by URI: a local path, `file://...`, or `s3://bucket/prefix` (AWS S3, MinIO, a local server).

Everything goes through `pyarrow.fs`, the same filesystem objects Ray Data and Ray Train take, so a URI means
the same thing to the job driver, to Ray Data's read tasks and to Train workers.

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE) plus an endpoint for non-AWS stores: AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000). Credentials are never logged or written anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlparse

import pyarrow.fs as pafs

from data.causes import causes


class StorageError(OSError):
    """A storage location that cannot be used; the message names the URI and what to do."""


class StorageRefused(StorageError):
    """Storage that refuses a write the same way on every try (no space left, read-only, no permission): not a
    fault to retry."""


_REFUSED_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_REFUSED_WORDS = (  # as S3 stores (AWS, MinIO) and pyarrow's messages say it
    "no space left",
    "quota exceeded",
    "read-only file system",
    "permission denied",
    "accessdenied",
    "access denied",
    "xminiostoragefull",
    "storage backend has reached",
)


def refused(error: BaseException) -> BaseException | None:
    """The OSError behind `error` (Ray wraps what its tasks raise) that says storage refuses writes, if any."""
    for e in causes(error):
        if isinstance(e, OSError) and (e.errno in _REFUSED_ERRNOS or any(w in str(e).lower() for w in _REFUSED_WORDS)):
            return e
    return None


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it (bucket/key for S3) and the URI as the user wrote it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def join(self, *parts: str) -> Location:
        path = str(PurePosixPath(self.path, *parts))
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    def __str__(self) -> str:
        return self.uri


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 client from the AWS environment; a short connect timeout so a dead endpoint fails fast."""
    endpoint = endpoint or s3_endpoint()
    kwargs: dict = dict(
        connect_timeout=3,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs.setdefault("region", "us-east-1")
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike, endpoint: str | None = None) -> Location:
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{text}: an S3 URI needs a bucket, e.g. s3://my-bucket/datasets/cityscapes")
        path = parsed.netloc + ("/" + parsed.path.strip("/") if parsed.path.strip("/") else "")
        return Location(s3_filesystem(endpoint), path, "s3://" + path)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else text
        absolute = os.path.abspath(os.path.expanduser(local))
        return Location(pafs.LocalFileSystem(), absolute, absolute)
    raise StorageError(f"{text}: unsupported URI scheme '{parsed.scheme}://' (use a local path, file:// or s3://)")


def _describe(loc: Location) -> str:
    if loc.is_s3:
        return f"{loc.uri} (endpoint {s3_endpoint() or 'AWS default'})"
    return loc.uri


def check_reachable(loc: Location) -> None:
    """Fail early, naming the URI, when the bucket cannot be reached or does not exist."""
    if not loc.is_s3:
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        info = loc.fs.get_file_info(bucket)
    except OSError as e:
        raise StorageError(
            f"cannot reach {_describe(loc)}: {_short(e)}. Check AWS_ENDPOINT_URL_S3, the network and credentials"
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket '{bucket}' of {loc.uri} does not exist (create it or fix the URI)")


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:300]


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.File


def size(loc: Location) -> int | None:
    info = loc.fs.get_file_info(loc.path)
    return info.size if info.type == pafs.FileType.File else None


def _children(loc: Location, kind: pafs.FileType) -> list[str]:
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
    return sorted(PurePosixPath(i.path).name for i in infos if i.type == kind)


def list_dirs(loc: Location) -> list[str]:
    """Names of the folders directly under `loc` (none if it does not exist)."""
    return _children(loc, pafs.FileType.Directory)


def list_files(loc: Location) -> list[Location]:
    """The files directly under `loc` (none if it does not exist)."""
    return [loc.join(name) for name in _children(loc, pafs.FileType.File)]


def delete(loc: Location) -> None:
    """Delete one file or object; nothing happens if it does not exist."""
    if not exists(loc):
        return
    if loc.is_s3:
        _s3_delete_object(loc)  # pyarrow's delete_file would leave an empty "folder/" marker object in its place
    else:
        loc.fs.delete_file(loc.path)


def delete_tree(loc: Location) -> None:
    """Delete a folder and everything under it; nothing happens if it does not exist."""
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
        return
    loc.fs.delete_dir(loc.path)


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "no such" in str(e).lower():
            raise FileNotFoundError(f"{loc.uri} does not exist") from None
        raise StorageError(f"cannot read {_describe(loc)}: {_short(e)}") from None


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Readers see the whole object or nothing: local files go through a temporary name and a rename;
    an S3 PUT (single or multipart) only becomes visible when it completes."""
    try:
        if loc.is_s3:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
            return
        parent = str(PurePosixPath(loc.path).parent)
        loc.fs.create_dir(parent, recursive=True)
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with loc.fs.open_output_stream(tmp) as f:
                f.write(data)
            loc.fs.move(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(OSError):  # no .tmp file stays behind a failed write
                loc.fs.delete_file(tmp)
            raise
    except OSError as e:
        kind = StorageRefused if refused(e) else StorageError
        raise kind(f"cannot write {_describe(loc)}: {_short(e)}") from None


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create the file or object only if it does not exist: True when this call created it, False when it was
    there. S3: a conditional PUT (If-None-Match: *, honoured by AWS S3, MinIO and moto); local: O_CREAT | O_EXCL."""
    try:
        if loc.is_s3:
            import boto3
            from botocore.exceptions import ClientError

            bucket, key = loc.path.split("/", 1)
            try:
                boto3.client("s3", endpoint_url=s3_endpoint()).put_object(
                    Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise StorageError(f"cannot write {_describe(loc)}: {_short(e)}") from None
            return True
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        try:
            fd = os.open(loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    except OSError as e:
        raise StorageError(f"cannot write {_describe(loc)}: {_short(e)}") from None


def check_writable(loc: Location) -> None:
    """Write and delete a small probe object under `loc`; a clear error when that is not possible. Leaves nothing
    behind: no folder that did not exist, no S3 folder-marker object."""
    check_reachable(loc)
    probe = loc.join(f".write-probe-{uuid.uuid4().hex[:8]}")
    if loc.is_s3:
        write_bytes_atomic(probe, b"ok")
        delete(probe)
        return
    missing = []  # folders the probe creates, innermost first
    folder = PurePosixPath(loc.path)
    while loc.fs.get_file_info(str(folder)).type == pafs.FileType.NotFound and folder != folder.parent:
        missing.append(str(folder))
        folder = folder.parent
    try:
        write_bytes_atomic(probe, b"ok")
        loc.fs.delete_file(probe.path)
    finally:
        for path in missing:
            try:
                os.rmdir(path)
            except OSError:
                break


def _s3_delete_object(loc: Location) -> None:
    import boto3

    bucket, key = loc.path.split("/", 1)
    boto3.client("s3", endpoint_url=s3_endpoint()).delete_object(Bucket=bucket, Key=key)


def sha256(loc: Location, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
