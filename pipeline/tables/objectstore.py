"""Small objects in one bucket through boto3: what a job's state in object storage needs and pyarrow lacks.

pyarrow's filesystem (`storage`) reads inputs and uploads outputs. It cannot
send a conditional write (`If-None-Match: *`, `If-Match`), list or abort
multipart uploads, or tell the server's clock, which the job's lock and the
clean-up of a killed run's leftovers need. This module is the one that speaks
boto3, with the same environment as `storage` (credentials, AWS_ENDPOINT_URL,
the region; never the cloud's metadata address unless the user allowed it).

Failures cross this boundary as `StoreError` (an OSError, with the bucket and key
and never a credential), `Conflict` for a failed condition (412, or 409 when two
writers raced), and `Unsupported` when the endpoint refuses conditional writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from pipeline.tables import storage

REGION = "us-east-1"  # an S3-compatible server takes any; AWS redirects a wrong one, which `storage.explain` names


class StoreError(OSError):
    """A request to object storage failed (the message names the bucket and key, never a credential)."""


class Conflict(StoreError):
    """A conditional write or delete lost: the object is not as the condition said."""


class Unsupported(StoreError):
    """The endpoint does not do conditional writes (an older S3-compatible server)."""


@dataclass(frozen=True)
class Head:
    etag: str
    last_modified: datetime
    server_now: datetime  # the Date of the server's answer: ages are judged on its clock, not ours


_CLIENTS: dict[tuple[str | None, str | None, str], Any] = {}


def client() -> Any:
    """A boto3 S3 client from the environment, one per process and settings (clients are thread-safe)."""
    instance_role = storage.check_credentials()
    env = os.environ
    endpoint = storage.endpoint()
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or REGION
    key = (endpoint, env.get("AWS_ACCESS_KEY_ID"), region)
    if key in _CLIENTS:
        return _CLIENTS[key]
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 4, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint else {},
    )
    with storage.metadata_address_off(not instance_role):
        made = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
    _CLIENTS[key] = made
    return made


class Bucket:
    """One bucket's objects, by key."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.s3 = client()

    def url(self, key: str) -> str:
        return f"{storage.SCHEME}{self.name}/{key}"

    def put(self, key: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write an object whole; its ETag. `if_none_match`: only if there is none; `if_match`: only if
        it is still that version."""
        extra: dict[str, str] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        with self._errors(key, "write"):
            return str(self.s3.put_object(Bucket=self.name, Key=key, Body=body, **extra)["ETag"])

    def upload(self, path: Path, key: str) -> None:
        """A local file of any size (multipart above boto3's threshold: a kill leaves an upload `abort_uploads` ends)."""
        with self._errors(key, "write"):
            self.s3.upload_file(str(path), self.name, key)

    def download(self, key: str, path: Path) -> None:
        with self._errors(key, "read"):
            self.s3.download_file(self.name, key, str(path))

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        with self._errors(key, "read"):
            try:
                return bytes(self.s3.get_object(Bucket=self.name, Key=key)["Body"].read())
            except self.s3.exceptions.NoSuchKey:
                return None

    def head(self, key: str) -> Head | None:
        with self._errors(key, "read"):
            try:
                answer = self.s3.head_object(Bucket=self.name, Key=key)
            except Exception as exc:
                if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        date = answer["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(answer["LastModified"].tzinfo)
        return Head(etag=str(answer["ETag"]), last_modified=answer["LastModified"], server_now=now)

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, in the server's (lexical) order."""
        with self._errors(prefix, "list"):
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield str(obj["Key"])

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        extra = {"IfMatch": if_match} if if_match is not None else {}
        with self._errors(key, "delete"):
            self.s3.delete_object(Bucket=self.name, Key=key, **extra)

    def delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            part = keys[start : start + 1000]
            with self._errors(part[0], "delete"):
                self.s3.delete_objects(Bucket=self.name, Delete={"Objects": [{"Key": k} for k in part], "Quiet": True})

    def abort_uploads(self, prefix: str, ours: Callable[[str], bool]) -> list[str]:
        """Abort every incomplete multipart upload under `prefix` whose key is `ours`: a killed run's
        parts are billed, and listed nowhere else. Returns the keys whose uploads were aborted."""
        aborted = []
        with self._errors(prefix, "list the uploads of"):
            for page in self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.name, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    if ours(upload["Key"]):
                        self.s3.abort_multipart_upload(Bucket=self.name, Key=upload["Key"], UploadId=upload["UploadId"])
                        aborted.append(str(upload["Key"]))
        return aborted

    def _errors(self, key: str, doing: str) -> _Translate:
        return _Translate(self.url(key), doing)


class _Translate:
    """botocore's errors as ours, at this boundary."""

    def __init__(self, url: str, doing: str) -> None:
        self.url, self.doing = url, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, StoreError) or not _from_botocore(exc):
            return
        code = _code(exc)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            raise Conflict(f"{self.url}: the object changed meanwhile ({code})") from None
        if code in ("NotImplemented", "501") or (code in ("InvalidArgument", "InvalidRequest", "400") and _names_condition(exc)):
            raise Unsupported(f"{self.url}: the endpoint refused a conditional request ({code})") from None
        raise StoreError(str(storage.explain(exc, self.url, self.doing))) from None


def _from_botocore(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("botocore", "boto3", "s3transfer"))


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")


def _names_condition(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "if-none-match" in text or "if-match" in text or "conditional" in text
