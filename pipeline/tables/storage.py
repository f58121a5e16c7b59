"""Object storage: `s3://bucket/key` inputs (globs too) and outputs, through pyarrow's S3 filesystem.

Credentials and the endpoint come from the usual environment: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (or AWS_PROFILE and ~/.aws), AWS_REGION
or AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for an
S3-compatible server; an http:// endpoint is spoken as plain HTTP with no other
setting. Nothing here prints or keeps a secret: errors name the variables, never
their values.

Inputs are copied to a local temporary folder before the run, a chunk at a
time (memory stays flat; the disk needs the inputs' size), so every later step
(checks, row counts, batches) reads them as local files. Outputs are written
locally as always and uploaded only on commit, once whole: nothing is uploaded
while the run may still fail. Up to S3's copy limit (5 GiB) the upload goes to a
temporary key beside the final one and is moved into place by a server-side
copy, so a reader never sees a partial object and a run that fails, even during
the upload, leaves nothing under the final key (pyarrow keeps an empty folder
marker, `folder/`, where it deletes the temporary key). A larger output cannot be
copied in one request (pyarrow's move is a single CopyObject), so it is uploaded
straight to its key as one multipart upload, which S3 shows only once it is
completed; Ctrl-C and SIGTERM wait until it is (see `upload`). The checkpoint
needs appends, which object storage does not do: `remote_state` keeps its
journal locally and ships it to the bucket in immutable segments.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from pipeline.errors import ConfigError, InputError, UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

SCHEME = "s3://"
COPY_CHUNK = 8 << 20  # bytes per read when copying an object: memory stays flat at any size
# pyarrow uploads parts in the background and queues every part it is given: without a wait the
# whole output sits in memory when the network is slower than the disk (1 GB: 1.1 GB of RSS).
UPLOAD_WINDOW = 64 << 20  # bytes handed over before waiting for the parts in flight
COPY_LIMIT = 5 << 30  # S3's largest CopyObject; above it an output is uploaded in place (see `upload`)
CREDENTIAL_HINT = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), "
    "or AWS_PROFILE for a profile in ~/.aws"
)


def is_remote(path: str | Path | Url) -> bool:
    return isinstance(path, Url) or str(path).startswith(SCHEME)


@dataclass(frozen=True, order=True)
class Url:
    """An object's address, with the few Path attributes the input and output code reads."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, text: str) -> Url:
        rest = text.removeprefix(SCHEME)
        bucket, _, key = rest.partition("/")
        if not bucket or not key or key.endswith("/"):
            raise InputError(f"{text} is not an object's address: give s3://bucket/path/file.parquet (or a glob under it).")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def fs_path(self) -> str:
        """As pyarrow's filesystem names it: bucket/key."""
        return f"{self.bucket}/{self.key}"

    def with_name(self, name: str) -> Url:
        return Url(self.bucket, str(PurePosixPath(self.key).with_name(name)))

    def resolve(self) -> Url:  # compared with other inputs and outputs as Paths are
        return self


def filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from the environment; ConfigError when there are no credentials.

    Without credentials in the environment or a profile, the AWS SDK would ask the cloud's instance
    metadata service at a link-local address; we refuse instead, so a laptop gets a clear message and
    never sends traffic there. (On a cloud machine with a role, export its credentials, or set
    AWS_EC2_METADATA_DISABLED=false to let the SDK ask for them.)"""
    import pyarrow.fs as pafs

    env = os.environ
    key, secret = env.get("AWS_ACCESS_KEY_ID", "").strip(), env.get("AWS_SECRET_ACCESS_KEY", "").strip()
    instance_role = check_credentials()
    options: dict[str, object] = {
        # Unset: the SDK reads the profile's region in ~/.aws/config, else takes us-east-1.
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        "connect_timeout": 10,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=4),
    }
    if key and secret:
        options.update(access_key=key, secret_key=secret, session_token=env.get("AWS_SESSION_TOKEN") or None)
    endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").strip()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        options["force_virtual_addressing"] = False  # an S3-compatible server: bucket in the path
    with metadata_address_off(not instance_role):
        return pafs.S3FileSystem(**options)


def check_credentials() -> bool:
    """ConfigError when the environment names no credentials (see `filesystem`); whether the user let the
    SDK ask the cloud's metadata address for them (AWS_EC2_METADATA_DISABLED=false)."""
    env = os.environ
    key, secret = env.get("AWS_ACCESS_KEY_ID", "").strip(), env.get("AWS_SECRET_ACCESS_KEY", "").strip()
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
    shared = Path(env.get("AWS_SHARED_CREDENTIALS_FILE", Path.home() / ".aws" / "credentials"))
    other = any(env.get(v) for v in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                                     "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"))  # fmt: skip
    instance_role = env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "false"
    if not (key and secret) and not profile and not shared.exists() and not other and not instance_role:
        raise ConfigError(f"No credentials for object storage. {CREDENTIAL_HINT}, then run again.")
    return instance_role


def endpoint() -> str | None:
    """An S3-compatible server's URL from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (https:// when no scheme)."""
    given = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "").strip().rstrip("/")
    if not given:
        return None
    return given if "://" in given else f"https://{given}"


@contextlib.contextmanager
def metadata_address_off(off: bool) -> Iterator[None]:
    """While the filesystem is made (the SDK decides then whether to ask the metadata address, for a
    region or credentials), AWS_EC2_METADATA_DISABLED=true unless the user set it; then the environment
    is as it was, so a program that imports us (the Python API) keeps its own AWS behaviour."""
    if not off or "AWS_EC2_METADATA_DISABLED" in os.environ:
        yield
        return
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        yield
    finally:
        os.environ.pop("AWS_EC2_METADATA_DISABLED", None)


def explain(exc: BaseException, url: Url | str, doing: str) -> UserError:
    """A storage failure as one paragraph that names the URL and the fix (never a credential)."""
    text = str(exc)
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "the specified bucket does not exist" in low:
        bucket = url.bucket if isinstance(url, Url) else str(url)
        return InputError(f"Cannot {doing} {url}: the bucket {bucket!r} does not exist. Check the bucket's name and region.")
    if any(
        w in low
        for w in (
            "accessdenied",
            "access denied",
            "access_denied",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "forbidden",
            "403",
        )
    ):
        return ConfigError(
            f"Cannot {doing} {url}: access denied. Check the credentials ({CREDENTIAL_HINT}) and that they may "
            f"{'write' if doing == 'write' else 'read'} there."
        )
    if "http status 301" in low or "permanentredirect" in low or "authorizationheadermalformed" in low:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1 (none set)"
        return ConfigError(
            f"Cannot {doing} {url}: the bucket is in another region than {region}. Set AWS_REGION to the "
            "bucket's region, then run again."
        )
    if any(w in low for w in ("couldn't connect", "connection refused", "curlcode: 7", "resolve host", "timeout", "timed out")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint"
        return ConfigError(f"Cannot {doing} {url}: {endpoint} could not be reached. Check AWS_ENDPOINT_URL and the network.")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return InputError(f"Cannot {doing} {url}: {first}")


def _bucket_problem(fs: pafs.S3FileSystem, url: Url, doing: str) -> UserError | None:
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(url.bucket)
    except OSError as exc:
        return explain(exc, url, doing)
    if info.type == pafs.FileType.NotFound:
        return InputError(f"Cannot {doing} {url}: the bucket {url.bucket!r} does not exist. Check the bucket's name and region.")
    return None


def resolve(pattern: str) -> list[Url]:
    """The objects an input names: one, or every match of a glob (sorted), or InputError."""
    import pyarrow.fs as pafs

    fs = filesystem()
    if not glob.has_magic(pattern):
        url = Url.parse(pattern)
        try:
            info = fs.get_file_info(url.fs_path)
        except OSError as exc:
            raise explain(exc, url, "read") from None
        if info.type == pafs.FileType.File:
            return [url]
        if (problem := _bucket_problem(fs, url, "read")) is not None:
            raise problem
        if info.type == pafs.FileType.Directory:
            raise InputError(f"Input {url} is a folder, not a file. Give the objects, or a glob such as '{url}/*.parquet'.")
        raise InputError(f"Input {url} does not exist. Check the bucket and the key (object names are case-sensitive).")
    rest = pattern.removeprefix(SCHEME)
    bucket, _, key_glob = rest.partition("/")
    fixed = key_glob[: min((key_glob.find(c) for c in "*?[" if c in key_glob), default=len(key_glob))]
    base = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
    below = key_glob[len(base) :].lstrip("/")  # the part with wildcards: list deeper only if it has folders
    selector = pafs.FileSelector(f"{bucket}/{base}".rstrip("/"), recursive="/" in below, allow_not_found=True)
    try:
        listed = fs.get_file_info(selector)
    except OSError as exc:
        raise explain(exc, pattern, "read") from None
    matched = sorted(
        Url(bucket, info.path.removeprefix(f"{bucket}/"))
        for info in listed
        if info.type == pafs.FileType.File and glob_matches(info.path.removeprefix(f"{bucket}/"), key_glob)
    )
    if not matched:
        if (problem := _bucket_problem(fs, Url(bucket, key_glob), "read")) is not None:
            raise problem
        raise InputError(f"No input object matches {pattern!r}. Check the pattern (quote it so the shell does not expand it).")
    return matched


def glob_matches(key: str, pattern: str) -> bool:
    """Whether an object's key matches a glob as a local path matches it with `glob.glob(recursive=True)`:
    `*`, `?` and `[...]` stay within one folder, `**` spans any number of folders, and a wildcard does not
    match a name that starts with a dot (so `reviews/*.parquet` does not read `reviews/2026/x.parquet`,
    nor a `.hidden` key)."""
    return _match_parts(key.split("/"), pattern.split("/"))


def _match_parts(names: list[str], parts: list[str]) -> bool:
    if not parts:
        return not names
    head, rest = parts[0], parts[1:]
    if head == "**":
        for skip in range(len(names) + 1):
            if _match_parts(names[skip:], rest):
                return True
            if skip < len(names) and names[skip].startswith("."):
                return False
        return False
    if not names:
        return False
    name = names[0]
    if name.startswith(".") and not head.startswith(".") and glob.has_magic(head):
        return False
    return fnmatch.fnmatchcase(name, head) and _match_parts(names[1:], rest)


def download(url: Url, dest: Path) -> None:
    """Copy an object to a local file, a chunk at a time."""
    fs = filesystem()
    try:
        with fs.open_input_stream(url.fs_path) as src, dest.open("wb") as out:
            while chunk := src.read(COPY_CHUNK):
                out.write(chunk)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or "disk" in str(exc).lower():
            raise InputError(f"Cannot copy {url} to {dest.parent}: {exc}. Free some space there or set TMPDIR.") from None
        raise explain(exc, url, "read") from None


def first_line(url: Url, most: int = 1 << 20) -> bytes | None:
    """The first non-blank line of an object (read up to `most` bytes), or None when it cannot be read:
    the caller only asks what kind of file it is, and the real read reports a problem properly."""
    try:
        with filesystem().open_input_stream(url.fs_path) as src:
            head = src.read(most)
    except OSError:
        return None
    return next((line for line in head.splitlines() if line.strip()), None)


def check_writable(url: Url) -> None:
    """Before anything is sent: the bucket exists and these credentials are accepted there. (A test
    write would leave pyarrow's folder markers behind; a refused upload at the end keeps the output
    locally and every answer in the checkpoint, so the run can be finished by running it again.)"""
    fs = filesystem()
    if (problem := _bucket_problem(fs, url, "write")) is not None:
        raise problem


def upload(local: Path, url: Url) -> None:
    """Put a finished local file at `url` so that it appears whole or not at all.

    Up to COPY_LIMIT: upload to a temporary key beside it, then move it into place (a server-side copy,
    then the temporary key is deleted); a failure or Ctrl-C part-way leaves nothing under `url`.
    Larger: S3 copies at most 5 GiB in one request and pyarrow's move is one CopyObject, so the file is
    uploaded straight to `url` as one multipart upload, which S3 shows only once it is completed. pyarrow
    completes it whenever its stream is closed, on an exception too, and offers no abort, so nothing may
    raise while the stream is open: Ctrl-C and SIGTERM are held until the upload ends, and a local read
    error is kept until the stream is closed (then the object it completed is deleted at once). A failed
    part upload is safe: pyarrow does not complete an upload with a failed part."""
    fs = filesystem()
    try:
        with local.open("rb") as src:
            if local.stat().st_size <= COPY_LIMIT:
                _upload_then_move(fs, src, url)
                return
            with _interrupts_held():
                with fs.open_output_stream(url.fs_path) as out:
                    unread = _send(src, out)
                if unread is not None:
                    with contextlib.suppress(OSError):
                        fs.delete_file(url.fs_path)
                    raise unread
    except OSError as exc:
        if exc.filename == str(local):
            raise OSError(f"Cannot upload {local} to {url}: reading it failed: {exc.strerror or exc}.") from None
        raise OSError(f"{explain(exc, url, 'write')} The output is whole locally at {local}.") from None


def _upload_then_move(fs: pafs.S3FileSystem, src: BinaryIO, url: Url) -> None:
    temporary = url.with_name(f".{url.name}.{os.getpid()}.uploading")
    try:
        with fs.open_output_stream(temporary.fs_path) as out:
            unread = _send(src, out)
        if unread is not None:
            raise unread
        fs.move(temporary.fs_path, url.fs_path)
    except BaseException:  # Ctrl-C too: pyarrow completes a partial upload, under the temporary key
        with contextlib.suppress(OSError):  # else a lifecycle rule can sweep '.uploading' keys
            fs.delete_file(temporary.fs_path)
        raise


def _send(src: BinaryIO, out: Any) -> OSError | None:
    """Copy a local file into an object's output stream, waiting for the parts in flight every
    UPLOAD_WINDOW bytes so that memory stays flat. A local read error is returned, not raised: the
    caller decides what becomes of the upload once the stream is closed."""
    handed = 0
    while True:
        try:
            chunk = src.read(COPY_CHUNK)
        except OSError as exc:
            exc.filename = exc.filename or src.name
            return exc
        if not chunk:
            return None
        out.write(chunk)
        handed += len(chunk)
        if handed >= UPLOAD_WINDOW:
            out.flush()  # waits for the background part uploads; raises if one failed
            handed = 0


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then take their course. Only the main thread runs
    Python's signal handlers, so elsewhere (the Python API's worker) nothing needs holding."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: set outside Python, which raises nothing here
            held[sig] = handler
            signal.signal(sig, lambda number, _frame: caught.append(number))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


def local_home(url: Url) -> Path:
    """The local folder for what an object output needs beside it (the checkpoint's working copy, the
    output's local copy, the metrics file and the report before they are uploaded):
    <state folder>/s3/<bucket>/<key's folder>, the same from whatever folder a run starts in."""
    from pipeline.tables.statedir import objects_dir

    return objects_dir().joinpath(url.bucket, *PurePosixPath(url.key).parent.parts)


def prefix(text: str) -> Url:
    """A folder in object storage (`s3://bucket/path/`, trailing slash optional), as the Url of its key prefix."""
    rest = text.removeprefix(SCHEME).rstrip("/")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise InputError(f"{text} is not a folder in object storage: give s3://bucket/folder/ (a bucket's root is not used).")
    return Url(bucket, key)


class Folder(type(Path())):  # type: ignore[misc]  # PosixPath on this platform: a subclass of Path's concrete class
    """A local output that is a folder of Parquet parts (`--output DIR/`, or a folder that exists)."""


def is_folder(text: str) -> bool:
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def location(text: str) -> Path | Url:
    """An output as the user gave it: a local path (a `Folder` for a folder of parts), or an object's address."""
    if is_remote(text):
        if text.endswith("/"):
            raise InputError(
                f"Output {text} is a folder in object storage: a folder of Parquet parts is written to a local (or "
                "shared) folder only. Give a file such as s3://bucket/results.parquet, or a local folder."
            )
        return Url.parse(text)
    return Folder(text) if is_folder(text) else Path(text)


def local_copy(url: Url) -> Path:
    """Where the local copy of an object output stays (beside its checkpoint): the report and
    `pipeline show` read it there."""
    return local_home(url) / url.name


def local_view(path: str) -> str:
    """What `pipeline show` and `pipeline report` read for an output: an object output's local copy
    (beside its checkpoint, where the run was started), a local path as it is."""
    return str(local_copy(Url.parse(path))) if is_remote(path) else path
