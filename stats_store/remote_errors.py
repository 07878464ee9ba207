"""How an s3:// store is reached (bounded retries and timeouts) and what its failures mean to a user.

s3fs (over aiobotocore) talks to the endpoint; botocore reads the endpoint, region and
credentials from the environment (``AWS_ENDPOINT_URL`` is honoured since botocore 1.34; checked
with 1.43 against moto). Retries are bounded so a gone endpoint fails the run instead of hanging:

* botocore, ``standard`` retry mode, ``MAX_ATTEMPTS`` attempts per request (connection refused,
  timeouts, 5xx, throttling), unless ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` set it;
* ``CONNECT_TIMEOUT_S`` to connect, ``READ_TIMEOUT_S`` for an answer, per attempt;
* s3fs's own loop around each call: ``S3FS_RETRIES`` = 1 try, no second retry layer (an
  attribute of the file system, not an option: ``store_io`` sets it on the instance).

A refused connection fails after the botocore attempts and their backoff (measured 2.9-6.5 s
here); an endpoint that accepts but never answers after MAX_ATTEMPTS x READ_TIMEOUT_S plus
backoff (measured with a 1 s read timeout instead of 20: 8.1 s).

``remote_error`` turns what s3fs/botocore raise into the store's errors, one line each: the URL,
the endpoint, what happened and what to do.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from stats_store.errors import (StatsStoreError, StoreAccessError, StoreNotFoundError, StoreRequestError,
                                StoreUnreachableError)
from stats_store.location import StoreLocation

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 20
MAX_ATTEMPTS = 3
# s3fs's loop wraps each call, and reads once more around that: with 2 tries a silent endpoint
# costs 2 x 2 x MAX_ATTEMPTS timeouts (measured). botocore's standard mode already retries
# connection errors, timeouts and 5xx, so s3fs does not retry again.
S3FS_RETRIES = 1


def s3_storage_options() -> dict[str, Any]:
    """s3fs options: no listing cache (other processes write the store), a fresh client, bounded retries."""
    config: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}
    if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        # A Config's retries override the environment's: set them only where the user did not.
        config["retries"] = {"mode": "standard", "max_attempts": MAX_ATTEMPTS}
    # skip_instance_cache: fsspec caches file systems by their arguments, not by the environment,
    # so a cached client would keep credentials the environment no longer has.
    # max_concurrency=1: one GET per object. Above 1, s3fs first HEADs every object to decide on
    # ranged parallel GETs, doubling the requests; the store's objects are KBs to a few MBs.
    return {"use_listings_cache": False, "skip_instance_cache": True, "max_concurrency": 1, "config_kwargs": config}


def endpoint_text() -> str:
    """The endpoint the environment selects, for messages."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"endpoint {url}" if url else "the AWS endpoint of the environment's region/profile (no AWS_ENDPOINT_URL)"


def _client_error(exc: BaseException) -> tuple[str, str]:
    """(code, message) of the botocore ClientError s3fs translated into ``exc``; ("", "") if none."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    err = getattr(cause, "response", None) or {}
    info = err.get("Error", {}) if isinstance(err, dict) else {}
    return str(info.get("Code", "")), str(info.get("Message", ""))


def remote_error(exc: BaseException, loc: StoreLocation) -> StatsStoreError | None:
    """The store error for an exception of an s3 request; None when ``exc`` is not such a failure."""
    from botocore import exceptions as bx
    from fsspec.exceptions import FSTimeoutError
    from s3fs.core import S3_RETRYABLE_ERRORS  # what s3fs itself treats as transport failures

    if isinstance(exc, StatsStoreError):
        return None
    where, endpoint = loc.url, endpoint_text()
    code, message = _client_error(exc)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.ProfileNotFound)):
        return StoreAccessError(
            f"{where}: {exc} ({endpoint}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or use an "
            "instance role, on the driver and on every node (credentials never come from the config)")
    if isinstance(exc, PermissionError):
        return StoreAccessError(
            f"{where}: {endpoint} refused the request ({code or 'Forbidden'}: {message or exc}); check "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and that they may read, write and list "
            f"s3://{loc.bucket}")
    if isinstance(exc, FileNotFoundError) and code == "NoSuchBucket":
        return StoreNotFoundError(
            f"{where}: bucket '{loc.bucket}' does not exist at {endpoint}; create it (aws s3 mb s3://{loc.bucket}) "
            "or point dump_stats_path at an existing bucket")
    if isinstance(exc, FileNotFoundError):
        return None  # a missing key: the caller decides what absence means
    if isinstance(exc, (bx.ConnectionError, *S3_RETRYABLE_ERRORS, FSTimeoutError, asyncio.TimeoutError, ConnectionError)):
        return StoreUnreachableError(
            f"{where}: {endpoint} did not answer ({type(exc).__name__}, {MAX_ATTEMPTS} attempts); check "
            "AWS_ENDPOINT_URL and that the server is up, then rerun the same command: committed shards are kept "
            "and the run resumes from them")
    if code:
        return StoreRequestError(f"{where}: {endpoint} answered {code}: {message}; fix the cause on the object "
                                 "storage side and rerun the same command (committed shards are kept)")
    return None
