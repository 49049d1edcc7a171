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
[--dialogue lock-step|pipelined] [--repo PATH]`` (needs valgrind, and smtp-sink for the
daemon and the minimal proxy; a daemon run takes about a minute and a half). ``--repo`` counts
another checkout of filterd with this script, so two versions compare side by side. Not
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

_CALLGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
_COLLECTED = re.compile(rb"Collected : (\d+)")
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


def count_evaluations(repo: Path, rules: Path, runs: int) -> int:
    done = subprocess.run(
        [*_CALLGRIND, sys.executable, "-c", _EVALUATE, str(rules), str(runs)],
        cwd=repo,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
    )
    return _collected(done.stderr)


def count_sessions(repo: Path, command: list[str], port: int, messages: int, dialogue: str) -> int:
    """Instructions the server started by ``command`` (listening on ``port``) executes, from
    its start to its exit after ``messages`` sessions."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*_CALLGRIND, *command],
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


def per_message(count: Callable[[int], int]) -> float:
    """Instructions per extra message (or evaluation) between a short and a long run."""
    return (count(LONG) - count(SHORT)) / (LONG - SHORT)


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
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("needs valgrind (apt install valgrind)")
    repo = args.repo.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
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
        if "evaluate" in args.what:
            evaluations = per_message(lambda runs: count_evaluations(repo, rules, runs))
            print(f"evaluate ({rules.name}): {evaluations:,.0f} instructions per evaluation")
        if "daemon" not in args.what and "minimal" not in args.what:
            return
        sink = Sink()
        try:
            if "daemon" in args.what:

                def daemon(messages: int) -> int:
                    port = free_port()
                    command = daemon_command(workdir, port, sink.port, rules)
                    return count_sessions(repo, command, port, messages, args.dialogue)

                print(
                    f"daemon ({rules.name}, {args.dialogue}): "
                    f"{per_message(daemon):,.0f} instructions per message"
                )
            if "minimal" in args.what:

                def minimal(messages: int) -> int:
                    port = free_port()
                    script = str(repo / "tests" / "bench" / "minimal_proxy.py")
                    command = [sys.executable, script, str(port), str(sink.port)]
                    return count_sessions(repo, command, port, messages, args.dialogue)

                print(
                    f"minimal proxy ({args.dialogue}): "
                    f"{per_message(minimal):,.0f} instructions per message"
                )
        finally:
            sink.stop()


if __name__ == "__main__":
    main()
