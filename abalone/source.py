"""Where a run's table comes from: the local file to read, and its sha256, computed once.

`locate(cfg)` finds it: data.path as given (a relative one also in the SageMaker training
channel, $SM_CHANNEL_TRAINING); with data.path null, data.url's file in the channel, else
data.url downloaded. A remote file (s3://, https://, http://) is kept in data.cache_dir and
revalidated on every run: HTTP asks with the ETag and Last-Modified its server gave
(a conditional GET), S3 compares the object's ETag; a changed file is downloaded again, and an
unreachable server leaves the cached copy in use, its age said. data.sha256 pins the file it
names (data.url's when set, else data.path's): a download that does not match is refused naming
the URL and never cached, and a cached copy that matches is used without asking the server.
What was used is recorded (`Located.tags`): the URL without credentials or signature, its ETag
or Last-Modified, when it was downloaded, how it was checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from omegaconf import DictConfig, OmegaConf

from abalone.redact import redact
from abalone.table import DataError

log = logging.getLogger(__name__)
REMOTE = ("s3://", "https://", "http://")
CHANNEL_ENV = "SM_CHANNEL_TRAINING"
TIMEOUT = 60  # seconds without an answer before a server counts as unreachable
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once
_FETCHED: dict[tuple, Located] = {}  # a process asks a server once (a sweep's trials agree)


@dataclass(frozen=True)
class Located:
    path: Path  # the local file to read
    source: str  # where it came from, as recorded: the local path, or the URL redacted
    sha256: str
    tags: dict[str, str] = field(default_factory=dict)  # what a run records of it (dataset.*)


class Unreachable(Exception):
    """The server did not answer (no network, refused, timed out): a cached copy may do."""


def sha256_of(path: Path) -> str:
    """The file's sha256, computed once per state (size, mtime) of the file in a process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _digest(path)
    return _HASHES[key]


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def locate(cfg) -> Located:
    """The file data.path or data.url names, downloaded or revalidated if remote; DataError
    naming the setting when there is none."""
    where, url = _setting(cfg), cfg.get("url")
    value = str(cfg.path) if cfg.path else None
    if value and value.startswith(REMOTE):
        return fetch(value, cfg.cache_dir, None if url else cfg.sha256, where.hint)
    if value:
        path = _local(value, where.name)
    elif url:
        channel = os.environ.get(CHANNEL_ENV)
        path = Path(channel) / file_name(url) if channel else None
        if path is None or not path.is_file():
            return fetch(str(url), cfg.cache_dir, cfg.sha256, where.hint)
    else:
        raise DataError("no data file: set data.path (a local file, s3://bucket/key or "
                        "https://...) or data.url")
    digest = sha256_of(path)
    if cfg.sha256 and not url and digest != cfg.sha256:
        raise DataError(f"{path} has sha256 {digest}, but data.sha256 is {cfg.sha256}")
    return Located(path, str(path), digest, {"dataset.path": str(path), "dataset.sha256": digest})


@dataclass(frozen=True)
class _Setting:
    name: str  # the setting as messages name it: data.path, or data.path ($ABALONE_DATA)
    hint: str  # how to use a local copy instead


def _setting(cfg) -> _Setting:
    raw = (OmegaConf.to_container(cfg, resolve=False).get("path")
           if isinstance(cfg, DictConfig) else cfg.path)
    env = re.search(r"oc\.env:\s*(\w+)", str(raw or ""))
    example = f"/path/to/{file_name(str(cfg.get('url') or cfg.path or 'table.csv'))}"
    hint = f"Download it yourself and point at the local copy with data.path={example}"
    if env:
        hint += f" or {env.group(1)}={example}"
    named = f"data.path (${env.group(1)})" if env and os.environ.get(env.group(1)) else "data.path"
    return _Setting(named, hint + ".")


def _local(value: str, named: str) -> Path:
    path = Path(value).expanduser()
    channel = os.environ.get(CHANNEL_ENV)
    if not path.is_file() and not path.is_absolute() and channel:
        path = Path(channel) / path
    if not path.is_file():
        raise DataError(f"{named} points at {value}, which is not a file"
                        + (f" (nor is {path})" if str(path) != value else ""))
    return path


def file_name(url: str) -> str:
    """The file's name in a path or URL, without query: abalone.data."""
    return PurePosixPath(unquote(urlsplit(url).path)).name or "table"


# -- remote files -----------------------------------------------------------------------------

def fetch(url: str, cache_dir: str, expected: str | None, hint: str) -> Located:
    """The cached copy of `url`, downloaded again if it changed (once per process); `expected`
    is the sha256 it must have."""
    shown = redact(url)
    path = (Path(cache_dir).expanduser()
            / f"{hashlib.sha256(shown.encode()).hexdigest()[:16]}-{file_name(url)}")
    key = (shown, str(path), expected)
    known = _FETCHED.get(key)
    if known is not None and (_record(path) or {}).get("sha256") == known.sha256:
        return known
    if url.startswith("http://") and not expected:
        log.warning("data: %s is plain http: nothing checks what arrives; pin it with "
                    "data.sha256", shown)
    record = _record(path)
    if record and expected and record["sha256"] == expected:
        how = "cached copy matches data.sha256; the server was not asked"
    else:
        try:
            get = _get_s3 if url.startswith("s3://") else _get_http
            # A copy that does not match data.sha256 is not asked about: downloaded again.
            record, how = get(url, shown, path, None if expected else record, expected, hint)
        except Unreachable as err:
            if record is None:
                raise DataError(f"could not download {shown}: {err}. {hint}") from err
            how = (f"{shown} is unreachable ({err}): using the copy downloaded "
                   f"{age(time.time() - record['downloaded'])} ago")
            log.warning("data: %s", how)
    if expected and record["sha256"] != expected:
        raise DataError(f"the copy of {shown} has sha256 {record['sha256']}, expected "
                        f"{expected} (data.sha256), and the server could not be asked. {hint}")
    tags = {"dataset.path": str(path), "dataset.sha256": record["sha256"],
            "dataset.source": shown, "dataset.check": how,
            "dataset.downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                time.gmtime(record["downloaded"]))}
    tags.update({f"dataset.{k}": record[k] for k in ("etag", "last_modified") if record.get(k)})
    _FETCHED[key] = Located(path, shown, record["sha256"], tags)
    return _FETCHED[key]


def _get_http(url, shown, path, record, expected, hint) -> tuple[dict, str]:
    parts = urlsplit(url)
    headers = {}
    if parts.password is not None:  # user:password@host: HTTP basic authentication
        login = f"{unquote(parts.username or '')}:{unquote(parts.password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(login).decode()
        url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
    if record and record.get("etag"):
        headers["If-None-Match"] = record["etag"]
    if record and record.get("last_modified"):
        headers["If-Modified-Since"] = record["last_modified"]
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 304 and record is not None:
            return record, "unchanged (HTTP 304 Not Modified)"
        raise DataError(f"could not download {shown}: HTTP {err.code} {err.reason}. {hint}"
                        ) from None
    except OSError as err:  # refused, unknown host, timed out (URLError is an OSError)
        raise Unreachable(getattr(err, "reason", err)) from err
    with response:
        validators = {"etag": response.headers.get("ETag"),
                      "last_modified": response.headers.get("Last-Modified")}
        new = _store(path, response.read, expected, shown, hint, validators)
    return new, "downloaded" + (": it changed" if record else "")


def _get_s3(url, shown, path, record, expected, hint) -> tuple[dict, str]:
    import botocore.exceptions as aws_errors

    from abalone.aws import _s3_client

    bucket, _, key = url[len("s3://"):].partition("/")
    s3 = _s3_client(max_attempts=3)
    try:
        etag = s3.head_object(Bucket=bucket, Key=key)["ETag"]
        if record and record.get("etag") == etag:
            return record, "unchanged (S3 ETag)"
        new = _store(path, lambda: s3.get_object(Bucket=bucket, Key=key, IfMatch=etag)[
            "Body"].read(), expected, shown, hint, {"etag": etag})
    except (aws_errors.ConnectionError, aws_errors.HTTPClientError) as err:
        raise Unreachable(err) from err
    except (aws_errors.BotoCoreError, aws_errors.ClientError) as err:  # 403, 404, credentials
        raise DataError(f"could not download {shown}: {err}. {hint}") from None
    return new, "downloaded" + (": it changed" if record else "")


def _store(path: Path, read, expected, shown, hint, validators: dict) -> dict:
    """Write what `read()` returns as the cached copy, only if whole and (with `expected`)
    matching; return its record (also written beside it, as PATH.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                out.write(read())
            except OSError as err:  # the connection broke mid-file
                raise Unreachable(err) from err
        digest = _digest(tmp)
        if expected and digest != expected:
            raise DataError(f"the file downloaded from {shown} has sha256 {digest}, expected "
                            f"{expected} (data.sha256); it was not kept. {hint}")
        tmp.replace(path)
        stat = path.stat()
        _HASHES[(str(path.resolve()), stat.st_size, stat.st_mtime_ns)] = digest
        record = {"url": shown, **{k: v for k, v in validators.items() if v},
                  "sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "downloaded": time.time()}
        tmp.write_text(json.dumps(record))
        tmp.replace(path.with_name(path.name + ".json"))
        return record
    finally:
        tmp.unlink(missing_ok=True)


def _record(path: Path) -> dict | None:
    """The record of the cached copy at `path`, if it describes the file there now."""
    try:
        record = json.loads(path.with_name(path.name + ".json").read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if (record.get("size"), record.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return None
    return record


def age(seconds: float) -> str:
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' * (count != 1)}"
    return f"{int(seconds)} seconds"
