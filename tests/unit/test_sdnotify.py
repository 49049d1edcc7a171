"""sd_notify protocol against a real AF_UNIX datagram socket (filesystem path and abstract)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filterd.sdnotify import Notifier, watchdog_loop


def _parse(datagram: bytes) -> dict[str, str]:
    fields = {}
    for line in datagram.decode().split("\n"):
        key, sep, value = line.partition("=")
        assert sep, f"field without '=': {line!r}"
        fields[key] = value
    return fields


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound SOCK_DGRAM socket standing in for systemd, and its NOTIFY_SOCKET spelling."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if request.param == "path":
        path = str(tmp_path / "notify")
        sock.bind(path)
        env_value = path
    else:
        name = f"filterd-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        env_value = "@" + name
    yield sock, env_value
    sock.close()


def test_ready_sends_ready_and_status(listener: tuple[socket.socket, str]) -> None:
    sock, env_value = listener
    with Notifier({"NOTIFY_SOCKET": env_value}) as notifier:
        assert notifier.enabled
        assert notifier.ready(status="listening on 127.0.0.1:10024")
    assert _parse(sock.recv(4096)) == {
        "READY": "1",
        "STATUS": "listening on 127.0.0.1:10024",
    }


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.stopping(), {"STOPPING": "1"}),
        (lambda n: n.status("draining 3 sessions"), {"STATUS": "draining 3 sessions"}),
        (lambda n: n.watchdog(), {"WATCHDOG": "1"}),
        (lambda n: n.extend_timeout(2.5), {"EXTEND_TIMEOUT_USEC": "2500000"}),
        (lambda n: n.status("two\nlines"), {"STATUS": "two lines"}),
    ],
)
def test_state_datagrams(
    listener: tuple[socket.socket, str],
    call: Callable[[Notifier], bool],
    expected: dict[str, str],
) -> None:
    sock, env_value = listener
    with Notifier({"NOTIFY_SOCKET": env_value}) as notifier:
        assert call(notifier)
    assert _parse(sock.recv(4096)) == expected


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, env_value = listener
    with Notifier({"NOTIFY_SOCKET": env_value}) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.ready()
    fields = _parse(sock.recv(4096))
    assert set(fields) == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    # The reload cycle ends with READY=1 as its own datagram.
    assert _parse(sock.recv(4096)) == {"READY": "1"}


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_without_usable_socket_everything_is_a_noop(environ: dict[str, str]) -> None:
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.watchdog()
    notifier.close()


def test_default_environment_is_read(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env_value = listener
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    with Notifier() as notifier:
        assert notifier.stopping()
    assert _parse(sock.recv(4096)) == {"STOPPING": "1"}


def test_send_to_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()
    path.unlink()
    with Notifier({"NOTIFY_SOCKET": str(path)}) as notifier:
        assert notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog() is False


def test_send_to_a_full_socket_does_not_block(tmp_path: Path) -> None:
    """systemd not reading: the datagram queue fills, sends fail fast instead of blocking."""
    path = str(tmp_path / "full")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    receiver.bind(path)
    try:
        with Notifier({"NOTIFY_SOCKET": path}) as notifier:
            results = []
            for _ in range(5000):
                results.append(notifier.status("x" * 512))
                if not results[-1]:
                    break
        assert results[0] is True
        assert results[-1] is False
    finally:
        receiver.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert Notifier(environ).watchdog_interval() == expected


def test_watchdog_loop_pings_a_real_socket(listener: tuple[socket.socket, str]) -> None:
    sock, env_value = listener
    sock.setblocking(False)

    async def scenario() -> list[dict[str, str]]:
        notifier = Notifier({"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "20000"})
        task = asyncio.create_task(watchdog_loop(notifier))
        loop = asyncio.get_running_loop()
        received: list[dict[str, str]] = []
        try:
            async with asyncio.timeout(10):
                while len(received) < 3:
                    received.append(_parse(await loop.sock_recv(sock, 4096)))
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            notifier.close()
        return received

    assert asyncio.run(scenario()) == [{"WATCHDOG": "1"}] * 3


def test_watchdog_loop_sleeps_half_the_interval(listener: tuple[socket.socket, str]) -> None:
    _, env_value = listener
    delays: list[float] = []

    async def recording_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 3:
            raise asyncio.CancelledError

    notifier = Notifier({"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "30000000"})
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watchdog_loop(notifier, sleep=recording_sleep))
    notifier.close()
    assert delays == [15.0, 15.0, 15.0]


@pytest.mark.parametrize(
    "environ",
    [
        {"WATCHDOG_USEC": "20000"},  # no socket to ping
        {
            "NOTIFY_SOCKET": "@filterd-unused",
            "WATCHDOG_USEC": "20000",
            "WATCHDOG_PID": str(os.getpid() + 1),  # armed for another process
        },
        {"NOTIFY_SOCKET": "@filterd-unused"},  # no watchdog armed
    ],
)
def test_watchdog_loop_returns_when_not_armed(environ: dict[str, str]) -> None:
    notifier = Notifier(environ)
    asyncio.run(asyncio.wait_for(watchdog_loop(notifier), timeout=5))
    notifier.close()
