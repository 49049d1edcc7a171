"""Where one message's time goes at one session: a timeline taken inside the daemon.

The daemon runs with a few of its methods wrapped to record a timestamp when they start and
end: the reads from the client and from the next hop, the writes to both, the DATA reader,
the delivery and the rule evaluation. smtp-source then sends messages one at a time through
it to smtp-sink, and the script prints, step by step, the median time between consecutive
events over all messages of the usual shape. Gaps that end in a read are waits for a peer;
the others are filterd's own work (a write's own span is mostly the system call waking the
peer). The wrappers add a microsecond or two per event.

``python tests/bench/timeline.py [--messages 3000] [--size 5000] [--rules rules]``
(needs Postfix's smtp-source and smtp-sink; the first 500 messages are warm-up).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import inspect
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.bench_smtp import SMTP_SOURCE, Sink  # noqa: E402
from tests.support.daemon import free_port, wait_port  # noqa: E402

WARM_UP = 500


# -- the instrumented daemon (run as a subprocess: ``timeline.py --daemon CONFIG OUT``) --------


def _instrument(events: list[tuple[str, int]]) -> None:
    """Wrap the daemon's methods so that each records (tag, ns) on entry and (tag_end, ns)."""
    from filterd import processor, smtp
    from filterd import smtp_protocol as protocol
    from filterd.actions import nexthop

    now = time.perf_counter_ns

    def wrap(owner: Any, name: str, tag: str) -> None:
        original = getattr(owner, name)
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                events.append((tag, now()))
                result = await original(*args, **kwargs)
                events.append((tag + "_end", now()))
                return result

            setattr(owner, name, timed_async)
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            events.append((tag, now()))
            try:
                return original(*args, **kwargs)
            finally:
                events.append((tag + "_end", now()))

        setattr(owner, name, timed)

    wrap(protocol.FilterdSMTP, "__init__", "init")
    wrap(protocol.FilterdSMTP, "connection_made", "connected")
    wrap(protocol.FilterdSMTP, "data_received", "client_read")
    wrap(protocol.FilterdSMTP, "push", "client_write")
    wrap(protocol.FilterdSMTP, "_read_data", "data_reader")
    wrap(protocol.FilterdSMTP, "connection_lost", "closed")
    wrap(smtp.FilterdHandler, "deliver", "deliver")
    wrap(nexthop._ReplyReader, "data_received", "next_hop_read")
    wrap(nexthop.NextHopConnection, "send", "next_hop_write")
    wrap(processor, "evaluate", "rules")


def run_daemon(config: str, out: str) -> None:
    events: list[tuple[str, int]] = []
    _instrument(events)

    def dump() -> None:
        Path(out).write_text("".join(f"{tag} {ns}\n" for tag, ns in events))

    atexit.register(dump)
    from filterd.cli import main

    sys.argv = ["filterd", "serve", "-c", config]
    main()


# -- the analysis ----------------------------------------------------------------------------


def analyse(path: Path) -> None:
    events = [(tag, int(ns)) for tag, ns in (line.split() for line in path.open())]
    messages: list[list[tuple[str, int]]] = []
    for tag, ns in events:
        if tag == "init":  # a new connection: one message each with smtp-source -s 1
            messages.append([])
        if messages:
            messages[-1].append((tag, ns))
    messages = messages[WARM_UP:-1]
    if not messages:
        sys.exit("no messages recorded past the warm-up")
    shapes = collections.Counter(tuple(tag for tag, _ in m) for m in messages)
    shape, count = shapes.most_common(1)[0]
    usual = [m for m in messages if tuple(tag for tag, _ in m) == shape]
    print(f"{len(messages)} messages, {count} of the usual shape; median µs between events:")
    for i in range(1, len(shape)):
        gap = statistics.median((m[i][1] - m[i - 1][1]) / 1000 for m in usual)
        print(f"  {shape[i - 1]:>18} -> {shape[i]:<18} {gap:8.1f}")
    whole = statistics.median((m[-1][1] - m[0][1]) / 1000 for m in usual)
    print(f"connection made to connection closed: median {whole:.0f} µs")


# -- the driver ------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--daemon":
        run_daemon(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--rules", type=Path, default=REPO / "rules")
    args = parser.parse_args()
    sink = Sink()
    with tempfile.TemporaryDirectory(prefix="filterd-timeline-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        config = workdir / "filterd.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{port}\nrelay: 127.0.0.1:{sink.port}\n"
            f"rules: {args.rules.resolve()}\nstate_dir: {workdir / 'state'}\n"
            "metrics: {listen: null}\nlog: {level: warning}\nworkers: 1\n"
        )
        out = workdir / "events.txt"
        daemon = subprocess.Popen(
            [sys.executable, __file__, "--daemon", str(config), str(out)], cwd=REPO
        )
        try:
            wait_port(port)
            subprocess.run(
                [
                    *(SMTP_SOURCE, "-s", "1", "-l", str(args.size), "-m", str(args.messages)),
                    *("-f", "bench@example.org", "-t", "sink@example.net", f"127.0.0.1:{port}"),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            sink.stop()
        analyse(out)


if __name__ == "__main__":
    main()
