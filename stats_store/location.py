"""Where a stats store lives: a local directory or a prefix on S3-protocol object storage.

``dump_stats_path`` takes three forms; the store is the prefix with ``.zarr`` appended (a value
already ending in ``.zarr`` is kept)::

    ./out/measure               → ./out/measure.zarr               (a local directory)
    file:///data/out/measure    → file:///data/out/measure.zarr    (the same, as a URL)
    s3://bucket/dir/measure     → s3://bucket/dir/measure.zarr     (objects under that key prefix)

Only the place is parsed here, never the way to reach it: an s3 endpoint, region and credentials
come from the environment the way every AWS client reads them (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role), never from
a config file. Parsing touches neither the disk nor the network and imports neither zarr nor
fsspec, so configs can be checked anywhere (``stats_store.store_io`` opens a location).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from stats_store.errors import StoreLocationError

ZARR_SUFFIX = ".zarr"
SCHEMES = ("file", "s3")
_FORMS = "a local path, file:///abs/path/prefix or s3://bucket/dir/prefix"
# AWS's rules for new bucket names (3-63 characters, lower-case letters, digits, dots, hyphens,
# starting and ending with a letter or digit); other S3 servers accept a subset of what AWS does.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store place. ``url`` is what the user wrote (with ``.zarr``): every message shows it.

    Attributes:
        url: the location as the user names it (a plain path stays a plain path).
        scheme: ``"file"`` or ``"s3"``.
        path: the local directory (``file``), or ``bucket/key`` without a scheme (``s3``).
    """

    url: str
    scheme: Literal["file", "s3"]
    path: str

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def local_path(self) -> Path:
        """The directory of a local location (an s3 one has none)."""
        if not self.is_local:
            raise StoreLocationError(f"{self.url} is on object storage, not a local directory")
        return Path(self.path)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.scheme == "s3" else ""

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def prefix_url(self) -> str:
        """The ``dump_stats_path`` this store belongs to (the URL without ``.zarr``)."""
        return self.url[: -len(ZARR_SUFFIX)] if self.url.endswith(ZARR_SUFFIX) else self.url

    def child(self, name: str) -> "StoreLocation":
        """The location ``name`` below this one (``ls`` of a directory of stores)."""
        plain = self.is_local and "://" not in self.url
        url = str(Path(self.url) / name) if plain else f"{self.url.rstrip('/')}/{name}"
        path = str(Path(self.path) / name) if self.is_local else f"{self.path.rstrip('/')}/{name}"
        return StoreLocation(url, self.scheme, path)

    def __str__(self) -> str:
        return self.url


def _with_suffix(text: str) -> str:
    head, _, last = text.rstrip("/").rpartition("/")
    if last.endswith(ZARR_SUFFIX):
        return text.rstrip("/")
    return f"{head}/{last}{ZARR_SUFFIX}" if head or text.startswith("/") else f"{last}{ZARR_SUFFIX}"


def parse_location(value: "str | os.PathLike[str] | StoreLocation", *, store: bool = True) -> StoreLocation:
    """Parse a ``dump_stats_path``, a store path or URL; with ``store``, append ``.zarr`` as needed.

    Raises:
        StoreLocationError: another scheme, a bad bucket name, an s3 URL without a key prefix,
            or a file URL naming another host; the message names the value and the accepted forms.
    """
    if isinstance(value, StoreLocation):
        return value
    text = os.fspath(value)
    if "://" not in text:
        p = Path(text)
        if store and not p.name:
            raise StoreLocationError(f"store location {text!r} names no directory; use {_FORMS}")
        if store and not p.name.endswith(ZARR_SUFFIX):
            p = p.with_name(p.name + ZARR_SUFFIX)
        return StoreLocation(str(p), "file", str(p))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise StoreLocationError(f"store location {text!r}: scheme {parts.scheme}:// is not supported; use {_FORMS}")
    if parts.query or parts.fragment:
        raise StoreLocationError(f"store location {text!r}: a store URL has no ?query or #fragment; use {_FORMS}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreLocationError(f"store location {text!r}: file URLs name this machine only "
                                     f"(file:///abs/path); use s3://bucket/prefix for shared storage")
        path = unquote(parts.path)
        if not path or path == "/":
            raise StoreLocationError(f"store location {text!r} names no directory; use file:///abs/path/prefix")
        url = f"file://{_with_suffix(path) if store else path}"
        return StoreLocation(url, "file", url[len("file://"):])
    return _parse_s3(text, parts.netloc, parts.path, store)


def _parse_s3(text: str, bucket: str, key: str, store: bool) -> StoreLocation:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise StoreLocationError(f"store location {text!r}: {bucket!r} is not a valid bucket name (3-63 lower-case "
                                 "letters, digits, dots or hyphens); use s3://bucket/dir/prefix")
    key = key.strip("/")
    segments = key.split("/") if key else []
    if not segments:
        raise StoreLocationError(f"store location {text!r} names a bucket but no prefix inside it; "
                                 f"use s3://{bucket}/dir/prefix")
    if any(s in ("", ".", "..") for s in segments):
        raise StoreLocationError(f"store location {text!r}: empty, '.' or '..' path segments are not allowed "
                                 "in object keys; use s3://bucket/dir/prefix")
    if store:
        key = _with_suffix(key)
    return StoreLocation(f"s3://{bucket}/{key}", "s3", f"{bucket}/{key}")


def check_dump_stats_path(value: str) -> str:
    """``value`` unless it is a URL of an unsupported form (config validation; nothing is touched).

    Plain paths are not checked here: INC loads any string, even an empty one, and a path only
    matters once a measurement starts.
    """
    if "://" in value:
        parse_location(value)
    return value
