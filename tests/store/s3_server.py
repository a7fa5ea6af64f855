"""A real S3-compatible server for the tests: ``moto``'s server on 127.0.0.1 and a free port.

Used by the object-storage and cluster tests (imported, not a conftest: test folders have none).
:func:`s3_server` starts the server in this process (threads serving HTTP, so worker processes
and subprocesses reach it over TCP like any S3 endpoint), creates a bucket and yields the
``storage_options`` for s3fs (``endpoint_url``, dummy ``key``/``secret``, ``anon=False``).
Skips the calling tests when ``moto[server]`` or ``s3fs`` is not installed (test extras).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

BUCKET = "dvl-ooc-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """A moto S3 server: ``url``, ``storage_options``, ``fs()`` (a fresh s3fs filesystem),
    ``stop()`` / ``start()`` (an outage keeps the port and, in this process, the data)."""

    def __init__(self, bucket: str = BUCKET) -> None:
        self.port = free_port()
        self.bucket = bucket
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.storage_options: dict[str, Any] = {
            "endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
            "anon": False,
        }
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"


@contextlib.contextmanager
def s3_server(bucket: str | None = None) -> Iterator[S3Server]:
    """Start the server, create ``bucket`` (default: a fresh ``dvl-ooc-test-<random>``: moto's
    state is global to the process, so buckets of an earlier server in the same test run
    still exist), yield the :class:`S3Server`, stop it."""
    import uuid

    bucket = bucket or f"{BUCKET}-{uuid.uuid4().hex[:8]}"
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extras)")
    pytest.importorskip("s3fs", reason="needs s3fs (the test extras)")
    srv = S3Server(bucket)
    srv.start()
    try:
        srv.fs().mkdir(bucket)
        yield srv
    finally:
        srv.stop()
