"""Serving fixtures: a real redis-server (durable AOF) on a free local port, history stores.

The Redis tests need the `redis-server` binary (Debian: `apt-get install -y redis-server`); when
it is missing they FAIL with that message rather than skip, so CI cannot pass without them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process with `appendonly yes`, `appendfsync always` in `dir`."""

    def __init__(self, dir: Path):
        self.dir = dir
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            pytest.fail(
                "redis-server is not installed: the Redis history store tests need it "
                "(Debian: apt-get install -y redis-server)",
                pytrace=False,
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            self.port = port or free_port()
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--bind", "127.0.0.1",
                    "--port", str(self.port),
                    "--dir", str(self.dir),
                    "--appendonly", "yes",
                    "--appendfsync", "always",
                    "--save", "",
                    "--daemonize", "no",
                    "--protected-mode", "no",
                    "--logfile", str(self.dir / "redis.log"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait_ready():
                return
            self.stop()
        log = (
            (self.dir / "redis.log").read_text()[-2000:]
            if (self.dir / "redis.log").exists()
            else ""
        )
        pytest.fail(f"redis-server did not start on port {self.port}:\n{log}", pytrace=False)

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def client(self):
        import redis

        return redis.Redis(port=self.port)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what is already in the AOF survives."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One durable redis-server shared by the session's tests (each test flushes it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill it."""
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["lmdb", "redis"])
def history_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty history store, once per backend."""
    if request.param == "lmdb":
        return f"lmdb://{tmp_path / 'history'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    client = server.client()
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
def open_store(history_url: str) -> Iterator[Callable]:
    """open_store(fields, **options): a store at `history_url`, closed after the test."""
    from longrec.serve import open_history

    opened = []

    def _open(fields, **options):
        store = open_history(history_url, fields, **options)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def unused_port() -> int:
    """A local TCP port nothing listens on."""
    return free_port()
