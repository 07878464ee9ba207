"""A real S3-protocol server on 127.0.0.1 for tests and benchmarks: moto's server as a subprocess.

Import it as ``tests.s3_server`` (tests and ``bench/`` alike; no copy):

    with S3Server.start() as server:          # python -m moto.server on a free loopback port
        bucket = server.new_bucket()          # an empty bucket of its own
        os.environ.update(server.env())       # AWS_ENDPOINT_URL + the IAM user's keys
        ... s3://<bucket>/dir/prefix ...

The server enforces authentication: an IAM user with an ``s3:*`` policy is created while auth is
still off, then ``/moto-api/reset-auth`` turns it on, so a wrong key is refused the way AWS
refuses it (``InvalidAccessKeyId``). :class:`Gate` is a TCP forwarder in front of the server
that a test closes and reopens: the endpoint goes away (connection refused) while the server,
and what it holds, stays up.

Pytest fixtures (import them into a test module): ``s3_server`` (session), ``s3_env`` (the
environment pointed at it), ``s3_bucket`` (a fresh bucket per test), ``s3_gate`` (a closable
endpoint in front of the server, with the environment pointed at it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REGION = "us-east-1"
# Environment keys a client could pick credentials or an endpoint from; the test environment sets
# or clears every one of them so the machine's own ~/.aws setup never leaks in.
AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
            "AWS_EC2_METADATA_DISABLED")
ISOLATED = {"AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with status {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not answer {url} within {timeout_s:.0f} s") from None
            time.sleep(0.1)


@dataclass
class S3Server:
    """``python -m moto.server`` on 127.0.0.1, with an IAM user whose keys the clients use."""

    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes] = field(repr=False)

    @classmethod
    def start(cls, port: int | None = None) -> "S3Server":
        port = port or free_port()
        endpoint = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_http(f"{endpoint}/moto-api/", proc)
            key, secret = _create_user(endpoint)
            # From here on every request must be signed with a key the IAM backend knows.
            req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})  # not a form: moto reads the body
            urllib.request.urlopen(req, timeout=10).close()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return cls(endpoint, key, secret, proc)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The environment a client needs: endpoint, the IAM user's keys, region; no config files,
        and no instance-metadata lookup (it would leave the machine when keys are missing)."""
        return {**ISOLATED, "AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self) -> Any:
        """A boto3 S3 client of the IAM user (test set-up and inspection only)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION)

    def new_bucket(self, prefix: str = "stats") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (sorted)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _create_user(endpoint: str) -> tuple[str, str]:
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                       region_name=REGION)
    iam.create_user(UserName="stats-writer")
    iam.put_user_policy(UserName="stats-writer", PolicyName="s3-all", PolicyDocument=json.dumps(POLICY))
    key = iam.create_access_key(UserName="stats-writer")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


class Gate:
    """A TCP forwarder on its own loopback port; ``close()`` makes the endpoint refuse connections.

    Closing also cuts the connections in flight, as a crashed or partitioned endpoint would.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone does not wake a thread blocked in accept(): the socket would keep
            # accepting. shutdown() does (Linux), and the port then refuses connections.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def close_on_connect(self) -> int:
        """A loopback port whose every connection closes the gate: another process (a Ray actor)
        can take the endpoint away at an exact point of its work."""
        trigger = socket.socket()
        trigger.bind(("127.0.0.1", 0))
        trigger.listen(8)

        def serve() -> None:
            while True:
                conn, _ = trigger.accept()
                self.close()
                conn.sendall(b"closed")  # answered once the gate is shut: the caller may go on
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return int(trigger.getsockname()[1])

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            if self._listener is not listener:  # accepted while closing
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# ---- pytest fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto server per test session (about 1 s to start); tests use buckets of their own."""
    with S3Server.start() as server:
        yield server


def point_env_at(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Replace every AWS variable of the environment by ``env`` (the rest cleared)."""
    for key in AWS_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The process environment points at the session's server for this test."""
    point_env_at(monkeypatch, s3_server.env())
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    return s3_env.new_bucket()


@pytest.fixture
def s3_gate(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """A closable endpoint in front of the session's server; the environment points at the gate."""
    gate = Gate(int(s3_server.endpoint.rsplit(":", 1)[1]))
    gate.open()
    point_env_at(monkeypatch, s3_server.env(gate.endpoint))
    try:
        yield gate
    finally:
        gate.close()
