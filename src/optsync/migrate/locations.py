"""Where migration files live: a local file, a local folder, or ``s3://bucket/prefix``.

S3 goes through boto3 with its usual credential chain (environment, profile, instance role);
the endpoint comes from ``--s3-endpoint-url`` or, as boto3 itself reads them,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto, any S3-compatible server).

Decisions: S3 objects are downloaded once into a temporary folder and read from there, because
an import reads every file twice (a validation pass, then the write pass). Gzip is recognised by
its magic bytes, not by the name, since Pinpoint's export object names are not specified.
Folders are read recursively in name order; names starting with ``.`` or ``_`` (``_SUCCESS``
markers, hidden files) are skipped.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from optsync.errors import ConfigError

__all__ = ("InputFile", "Output", "is_s3", "open_text", "staged_inputs")


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"{url!r} names no bucket: write s3://bucket/prefix")
    return bucket, prefix


def s3_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client; boto3 reads AWS_ENDPOINT_URL_S3 itself when ``endpoint_url`` is None."""
    import boto3  # noqa: PLC0415  (only commands that touch S3 pay for the import)

    return boto3.client("s3", endpoint_url=endpoint_url) if endpoint_url else boto3.client("s3")


@dataclass(frozen=True)
class InputFile:
    """One input file: ``name`` as the user knows it (a path or an s3:// URL), ``path`` local."""

    name: str
    path: Path


def _skip(name: str) -> bool:
    return name.startswith((".", "_"))


def _local_files(location: str) -> list[InputFile]:
    path = Path(location)
    if path.is_file():
        return [InputFile(str(path), path)]
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(_skip(part) for part in p.relative_to(path).parts)
        )
        return [InputFile(str(p), p) for p in found]
    raise ConfigError(f"{location}: no such file or folder")


def _s3_files(url: str, client: Any, folder: Path) -> list[InputFile]:
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    bucket, prefix = _split_s3(url)
    files: list[InputFile] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = sorted(
            o["Key"]
            for page in pages
            for o in page.get("Contents", [])
            if not o["Key"].endswith("/") and not _skip(o["Key"].rsplit("/", 1)[-1])
        )
        for n, key in enumerate(keys):
            local = folder / f"{n:06d}"
            with local.open("wb") as out:
                client.download_fileobj(bucket, key, out)
            files.append(InputFile(f"s3://{bucket}/{key}", local))
    except (BotoCoreError, ClientError) as exc:
        raise ConfigError(f"{url}: cannot read from S3: {exc}") from exc
    if not files:
        raise ConfigError(f"{url}: no objects under this prefix")
    return files


@contextmanager
def staged_inputs(
    locations: tuple[str, ...], endpoint_url: str | None
) -> Iterator[list[InputFile]]:
    """Every input file of ``locations``, S3 objects downloaded to a folder removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="optsync-import-"))
    try:
        files: list[InputFile] = []
        client = None
        for location in locations:
            if is_s3(location):
                client = client or s3_client(endpoint_url)
                files.extend(_s3_files(location, client, folder))
            else:
                files.extend(_local_files(location))
        yield files
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def open_text(path: Path) -> Iterator[IO[str]]:
    """The file as UTF-8 text, gunzipped when it is gzip."""
    with path.open("rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        binary = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw
        with io.TextIOWrapper(cast(IO[bytes], binary), encoding="utf-8-sig", newline="") as text:
            yield text


class Output:
    """Where an export writes its files: a local folder (or file) or ``s3://bucket/prefix``."""

    def __init__(self, location: str, endpoint_url: str | None) -> None:
        self.location = location
        self._client: Any = None
        if is_s3(location):
            self._bucket, prefix = _split_s3(location)
            self._prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
            self._client = s3_client(endpoint_url)
        else:
            self._folder = Path(location)
            if self._folder.is_file():
                raise ConfigError(f"{location} is a file: give a folder for the export files")
            self._folder.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, data: bytes) -> str:
        """Store one file; its full name (path or s3:// URL)."""
        if self._client is None:
            path = self._folder / name
            path.write_bytes(data)
            return str(path)
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        key = f"{self._prefix}{name}"
        try:
            self._client.upload_fileobj(io.BytesIO(data), self._bucket, key)
        except (BotoCoreError, ClientError) as exc:
            raise ConfigError(f"s3://{self._bucket}/{key}: cannot write to S3: {exc}") from exc
        return f"s3://{self._bucket}/{key}"
