"""Instructions per message, counted by valgrind's callgrind: a measure of filterd's own work
that a busy host does not move.

Timings on a shared 2-core VM move by ±15% from one run to the next, more than most changes
to the code are worth. Callgrind counts the instructions a process executes, which for the same
program and input is the same whatever else the machine does (repeatable here to ~0.1%). It
does not see what the instructions cost (cache misses, wake-ups, system calls): use it to
compare two versions of the code, and the latency run of ``bench_smtp.py`` for what a client
sees.

Each figure is the difference between a short and a long run divided by the number of extra
messages, so start-up and shut-down cancel out:

- ``evaluate``: one evaluation of a rule set (the shipped rules by default) on the benchmark's
  5 KB message, parse included, in-process;
- ``daemon``: one message through a one-worker ``filterd serve`` at one session, the session
  included (connect, dialogue, relay to smtp-sink, QUIT), in the lock-step or the pipelined
  dialogue of ``bench_smtp.py``; with ``--rules none`` the daemon runs an empty rule set;
- ``minimal``: the same through ``minimal_proxy.py``, the least a Python proxy does.

``python tests/bench/count_instructions.py [evaluate|daemon|minimal ...] [--rules PATH|none]
[--dialogue lock-step|pipelined] [--repo PATH] [--top N] [--callers REGEX]`` (needs valgrind,
and smtp-sink for the daemon and the minimal proxy; a daemon run takes about a minute and a
half). ``--repo`` counts another checkout of filterd with this script, so two versions compare
side by side.

Where the instructions go, per message, by C function (the same difference of two runs, from
``callgrind_annotate``): ``--top N`` lists the N functions with the most instructions of their
own, and ``--callers REGEX`` who calls the functions whose names match, how often per message
and at what cost. Python code all counts as the interpreter's eval loop, so this shows the
work no Python profiler sees: allocation, the C side of built-in methods, and exceptions that
are raised and caught unseen (``PyErr_Format``, ``PyTraceBack_Here``). The interpreter of a
Debian install has no symbols for its internal functions, which show as addresses. Not
collected by pytest.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.bench_smtp import (  # noqa: E402
    LOCK_STEP,
    PIPELINED,
    Sink,
    bench_payload,
    timed_message,
)
from tests.support.daemon import free_port, wait_port  # noqa: E402

_COLLECTED = re.compile(rb"Collected : (\d+)")
# A line of ``callgrind_annotate --tree=caller``: its cost, then "*" for the function itself
# (its own instructions) or "<" for one of its callers (the cost of its calls from there, and
# how many there were).
_TREE_LINE = re.compile(
    r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+([*<>])\s+(.*?)(?:\s+\(([\d,]+)x\))?(?:\s+\[.*\])?\s*$"
)
SHORT, LONG = 200, 1200  # messages (or evaluations) in the two runs
START_TIMEOUT = 300.0  # a daemon under callgrind starts about fifty times slower

_EVALUATE = """
import sys
from filterd.model import Envelope, Message
from filterd.rules import evaluate, load_ruleset
from tests.bench.bench_smtp import bench_payload
ruleset = load_ruleset(sys.argv[1])
raw = bench_payload(5000)[:-3]  # without the end-of-data marker, as the daemon hands it on
envelope = Envelope("bench@example.org", ("sink@example.net",), client_ip="127.0.0.1")
message = Message(envelope, raw)
for _ in range(int(sys.argv[2])):
    evaluate(ruleset, message)
"""


def _collected(output: bytes) -> int:
    found = _COLLECTED.search(output)
    if found is None:
        sys.stderr.write(output.decode(errors="replace")[-3000:])
        raise RuntimeError("callgrind reported no instruction count")
    return int(found.group(1))


def _callgrind(out: Path | None) -> list[str]:
    """valgrind's callgrind, writing its profile to ``out`` (None: nowhere, the count only)."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out or '/dev/null'}"]


def count_evaluations(repo: Path, rules: Path, runs: int, out: Path | None = None) -> int:
    done = subprocess.run(
        [*_callgrind(out), sys.executable, "-c", _EVALUATE, str(rules), str(runs)],
        cwd=repo,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
    )
    return _collected(done.stderr)


def count_sessions(
    repo: Path,
    command: list[str],
    port: int,
    messages: int,
    dialogue: str,
    out: Path | None = None,
) -> int:
    """Instructions the server started by ``command`` (listening on ``port``) executes, from
    its start to its exit after ``messages`` sessions."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*_callgrind(out), *command],
            cwd=repo,
            env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_port(port, timeout=START_TIMEOUT)
            payload = bench_payload(5000)
            for _ in range(messages):
                timed_message(port, payload, dialogue)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        log.seek(0)
        return _collected(log.read())


def daemon_command(workdir: Path, port: int, relay_port: int, rules: Path) -> list[str]:
    config = workdir / f"filterd-{port}.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nrelay: 127.0.0.1:{relay_port}\nrules: {rules}\n"
        f"state_dir: {workdir / f'state-{port}'}\nmetrics: {{listen: null}}\n"
        "log: {level: warning, format: json}\nworkers: 1\n"
    )
    return [sys.executable, "-m", "filterd", "serve", "-c", str(config)]


@dataclass
class CallTree:
    """A callgrind profile by function: the instructions each executed itself, and for each
    of its callers how many calls came from there and what they cost in all."""

    own: dict[str, int] = field(default_factory=dict)
    callers: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)


def parse_call_tree(text: str) -> CallTree:
    """``callgrind_annotate --tree=caller`` output as a CallTree. Its blocks, one per function,
    list the callers ("<" lines) before the function itself (the "*" line)."""
    tree = CallTree()
    callers: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        found = _TREE_LINE.match(line)
        if found is None:
            if not line.strip():
                callers = {}  # a block ended without its "*" line (a summary, say)
            continue
        cost, kind, name, calls = found.groups()
        instructions = int(cost.replace(",", ""))
        if kind == "<":
            callers[name] = (int((calls or "0").replace(",", "")), instructions)
        elif kind == "*":
            tree.own[name] = tree.own.get(name, 0) + instructions
            tree.callers[name] = callers
            callers = {}
    return tree


def call_tree(profile: Path) -> CallTree:
    done = subprocess.run(
        ["callgrind_annotate", "--tree=caller", "--threshold=100", str(profile)],
        capture_output=True,
        text=True,
        check=True,
    )
    return parse_call_tree(done.stdout)


def breakdown(long: CallTree, short: CallTree, extra: int, top: int, callers: str | None) -> str:
    """Per extra message (or evaluation): the ``top`` functions by their own instructions,
    and the callers of the functions whose names match ``callers``."""
    lines = [f"  {'own instructions':>16}  function"]
    own = {
        name: (cost - short.own.get(name, 0)) / extra
        for name, cost in long.own.items()
        if cost > short.own.get(name, 0)
    }
    for name, cost in sorted(own.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {cost:16,.0f}  {name}")
    if callers is not None:
        wanted = re.compile(callers)
        for name in sorted(n for n in long.callers if wanted.search(n)):
            before = short.callers.get(name, {})
            lines.append(f"  callers of {name} (calls and their instructions, per message):")
            for caller, (calls, cost) in sorted(
                long.callers[name].items(), key=lambda item: -item[1][1]
            ):
                old_calls, old_cost = before.get(caller, (0, 0))
                if calls > old_calls:
                    lines.append(
                        f"  {(calls - old_calls) / extra:8.2f} x {(cost - old_cost) / extra:10,.0f}"
                        f"  {caller}"
                    )
    return "\n".join(lines)


def per_message(count: Callable[[int, Path | None], int], profiles: Path | None = None) -> float:
    """Instructions per extra message (or evaluation) between a short and a long run; with
    ``profiles`` (a folder) the two runs leave their callgrind profiles there (see
    ``profiles_of``)."""
    long_out, short_out = profiles_of(profiles)
    return (count(LONG, long_out) - count(SHORT, short_out)) / (LONG - SHORT)


def profiles_of(folder: Path | None) -> tuple[Path | None, Path | None]:
    """Where the long and the short run write their profiles."""
    if folder is None:
        return None, None
    return folder / "long.callgrind", folder / "short.callgrind"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        nargs="*",
        default=["evaluate", "daemon", "minimal"],
        choices=["evaluate", "daemon", "minimal"],
    )
    parser.add_argument("--rules", default=str(REPO / "rules"), help="a rule path, or none")
    parser.add_argument("--dialogue", choices=[LOCK_STEP, PIPELINED], default=LOCK_STEP)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to count")
    parser.add_argument("--top", type=int, default=0, help="list the N costliest C functions")
    parser.add_argument("--callers", help="list the callers of the C functions matching this")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("needs valgrind (apt install valgrind)")
    repo = args.repo.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        profiles = workdir if args.top or args.callers else None
        rules = Path(args.rules)
        if args.rules == "none":
            rules = workdir / "no-rules"
            rules.mkdir()
            (rules / "empty.yaml").write_text("rules: []\n")
        print(f"{sys.executable}, counting {repo}")
        # Byte-compiled beforehand: a module compiled during one run and not the other would
        # count as per-message work.
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "filterd", "tests"], cwd=repo, check=True
        )

        def measure(label: str, count: Callable[[int, Path | None], int], unit: str) -> None:
            print(f"{label}: {per_message(count, profiles):,.0f} instructions per {unit}")
            long_out, short_out = profiles_of(profiles)
            if long_out is not None and short_out is not None:
                trees = call_tree(long_out), call_tree(short_out)
                print(breakdown(*trees, LONG - SHORT, args.top, args.callers))

        if "evaluate" in args.what:
            measure(
                f"evaluate ({rules.name})",
                lambda runs, out: count_evaluations(repo, rules, runs, out),
                "evaluation",
            )
        if "daemon" not in args.what and "minimal" not in args.what:
            return
        sink = Sink()
        try:
            if "daemon" in args.what:

                def daemon(messages: int, out: Path | None) -> int:
                    port = free_port()
                    command = daemon_command(workdir, port, sink.port, rules)
                    return count_sessions(repo, command, port, messages, args.dialogue, out)

                measure(f"daemon ({rules.name}, {args.dialogue})", daemon, "message")
            if "minimal" in args.what:

                def minimal(messages: int, out: Path | None) -> int:
                    port = free_port()
                    script = str(repo / "tests" / "bench" / "minimal_proxy.py")
                    command = [sys.executable, script, str(port), str(sink.port)]
                    return count_sessions(repo, command, port, messages, args.dialogue, out)

                measure(f"minimal proxy ({args.dialogue})", minimal, "message")
        finally:
            sink.stop()


if __name__ == "__main__":
    main()
