"""filterd's ingress served in-process, against a real next hop on loopback.

The daemon's objects are built as ``filterd serve`` builds them (``app.Daemon``), but its
listening socket is served on the test's own event loop, so a test can see the tasks a session
creates, what the loop reports as errors, and the daemon's state after the client is done, and
can swap in a protocol subclass or patch a function to inject a fault.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

from filterd.app import Daemon
from filterd.config import Config, HostPort, QuarantineConfig, default_config
from filterd.smtp_protocol import FilterdSMTP
from tests.support.nexthop import NextHop


def inprocess_config(
    tmp_path: Path,
    nexthop: NextHop,
    *,
    limits: dict[str, Any] | None = None,
    rules: str | None = None,
) -> Config:
    """The default config, relaying to ``nexthop``, with its state under ``tmp_path``; one
    process, no metrics listener. ``limits`` replaces config limits, ``rules`` is a rule
    file's text."""
    config = default_config()
    overrides: dict[str, Any] = {}
    if rules is not None:
        rule_file = tmp_path / "rules.yaml"
        rule_file.write_text(rules)
        overrides["rules"] = str(rule_file)
    return dataclasses.replace(
        config,
        relay=HostPort("127.0.0.1", nexthop.port),
        state_dir=str(tmp_path / "state"),
        quarantine=QuarantineConfig(path=str(tmp_path / "state" / "quarantine")),
        metrics_listen=None,
        workers=1,
        limits=dataclasses.replace(config.limits, **(limits or {})),
        **overrides,
    )


def serve_in_process(
    tmp_path: Path,
    nexthop: NextHop,
    client: Callable[[int], Any],
    reports: list[dict[str, Any]] | None = None,
    protocol: type[FilterdSMTP] = FilterdSMTP,
    *,
    limits: dict[str, Any] | None = None,
    rules: str | None = None,
    after: Callable[[Daemon], Any] | None = None,
) -> tuple[Any, list[str]]:
    """Serve one client (run in a thread with the port) with ``protocol``; returns its result
    and the names of the coroutines of every task created meanwhile. ``limits`` replaces
    config limits, ``rules`` is a rule file's text; what the event loop reports as errors goes
    to ``reports``; ``after`` sees the daemon once the session has ended, before it stops."""
    config = inprocess_config(tmp_path, nexthop, limits=limits, rules=rules)
    created: list[str] = []

    def counting_factory(
        loop: asyncio.AbstractEventLoop, coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any]
    ) -> asyncio.Task[Any]:
        created.append(type(coro).__name__ + ":" + getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop)

    async def main() -> Any:
        daemon = Daemon(config, None, {})
        loop = asyncio.get_running_loop()
        policy = daemon.handler.policy
        server = await loop.create_server(lambda: protocol(daemon.handler, policy), "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        loop.set_task_factory(counting_factory)
        if reports is not None:
            loop.set_exception_handler(lambda _loop, context: reports.append(context))
        try:
            result = await loop.run_in_executor(None, client, port)
            for _ in range(100):  # until the session is accounted for
                if not daemon.handler.active and not daemon.handler.in_flight:
                    break
                await asyncio.sleep(0.01)
            assert not daemon.handler.active
            gc.collect()  # an unretrieved exception is reported when its future is freed
            if after is not None:
                result = (result, after(daemon))
            return result
        finally:
            loop.set_task_factory(None)
            server.close()
            await server.wait_closed()
            await daemon.relay.close()

    return asyncio.run(main()), created
