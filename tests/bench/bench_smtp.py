"""Throughput, CPU and memory of filterd under real SMTP load, side by side with the direct path.

Postfix's ``smtp-source`` drives load (a new connection per message) and ``smtp-sink`` is the
next hop. Every configuration is measured in the same run, ``--runs`` times, and the median is
reported:

    direct        smtp-source -> smtp-sink
    naive relay   smtp-source -> 30-line aiosmtpd/aiosmtplib relay -> smtp-sink (the floor)
    filterd ...   smtp-source -> filterd (0 rules / shipped rules / shipped + 1,000 regex) -> smtp-sink

For filterd the CPU time (user+system) of its processes per message and their peak RSS are read
from /proc. filterd logs at ``warning`` unless ``--log-level info`` asks for the shipped
config's one line per message. Then the latency run (one session, one message at a time; with a minimal Python
proxy, ``minimal_proxy.py``, timed beside filterd as a reference) and the large-message run
(10 x 20 MB at once beside a client sending small messages), the latter with smtp-sink and with
a fair asyncio next hop (``fair_sink.py``; see ``--large-sink``). Run as root or as a user
smtp-sink may run as:

    python tests/bench/bench_smtp.py [--messages 5000] [--sessions 20] [--size 5000] [--runs 3]
                                     [--log-level warning|info]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.bench_wakeup import (  # noqa: E402
    idle_policy,
    ping_pong,
    write_waking_a_reader,
)
from tests.support.daemon import free_port, wait_port  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


@dataclass
class Result:
    name: str
    rate: float
    cpu_ms: float | None = None
    rss_mb: float | None = None


def regex_rules(count: int) -> str:
    """``count`` regex rules that never match ordinary mail, half on headers, half on the body."""
    lines = ["rules:"]
    for i in range(count):
        if i % 2:
            cond = f'{{header: {{name: Subject, regex: "zq{i}x+(foo|bar)[0-9]{{2,4}}"}}}}'
        else:
            cond = f'{{body: {{regex: "(?i)unlikely-token-{i}\\\\s+(alpha|beta)\\\\d+"}}}}'
        lines += [f"  - name: generated-{i}", f"    if: {cond}", "    then: {score: 0.1}"]
    return "\n".join(lines) + "\n"


def proc_cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids``."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime and stime, in clock ticks
        system += int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def proc_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids``."""
    return sum(proc_cpu_split(pids))


def proc_status_mb(pids: list[int], field: str) -> float:
    """Sum of a /proc/PID/status memory field (VmRSS now, VmHWM peak) over ``pids``, in MB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def proc_peak_rss_mb(pids: list[int]) -> float:
    return proc_status_mb(pids, "VmHWM")


def rss_mb(pids: list[int]) -> float:
    return proc_status_mb(pids, "VmRSS")


def family(pid: int) -> list[int]:
    """The process and its children (worker processes)."""
    try:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
        )
    except OSError:
        return [pid]
    return [pid, *(int(p) for p in out.stdout.split())]


def run_source(port: int, messages: int, sessions: int, size: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            SMTP_SOURCE,
            "-s",
            str(sessions),
            "-l",
            str(size),
            "-m",
            str(messages),
            "-f",
            "bench@example.org",
            "-t",
            "sink@example.net",
            f"127.0.0.1:{port}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return messages / (time.perf_counter() - started)


class Sink:
    def __init__(self) -> None:
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *user, f"127.0.0.1:{self.port}", "1000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_filterd(
    workdir: Path,
    relay_port: int,
    rules: Path,
    workers: int,
    log_level: str,
    name: str = "filterd",
) -> tuple[subprocess.Popen[bytes], int]:
    """Start filterd on a free port; ``name`` keeps the config, state and log of daemons that
    run at the same time apart."""
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nrelay: 127.0.0.1:{relay_port}\nrules: {rules}\n"
        f"state_dir: {workdir / (name + '-state')}\nmetrics: {{listen: null}}\n"
        f"log: {{level: {log_level}, format: json}}\n"
        f"workers: {workers}\nlimits: {{max_connections: 500}}\n"
    )
    proc = start_daemon(config, workdir / f"{name}.log")
    wait_daemon(proc, port, workdir / f"{name}.log")
    time.sleep(0.5)
    return proc, port


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``filterd serve -c config`` with its log lines going to ``log`` (as a deployment's go to
    the journal), not to the benchmark's terminal."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "filterd", "serve", "-c", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_daemon(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait until the daemon listens; if it does not, stop it and show why (its log)."""
    try:
        wait_port(port)
    except BaseException:
        proc.terminate()
        proc.wait(10)
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise


def measure_filterd(
    name: str, workdir: Path, sink: Sink, rules: Path, args: argparse.Namespace
) -> Result:
    proc, port = start_filterd(workdir, sink.port, rules, args.workers, args.log_level)
    try:
        run_source(port, min(200, args.messages), args.sessions, args.size)  # warm-up
        pids = family(proc.pid)
        cpu_before = proc_cpu_seconds(pids)
        rate = run_source(port, args.messages, args.sessions, args.size)
        cpu = proc_cpu_seconds(pids) - cpu_before
        rss = proc_peak_rss_mb(pids)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return Result(name, rate, cpu * 1000 / args.messages, rss)


def start_bench_relay(script: str, next_hop_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start one of the reference relays in tests/bench (``script LISTEN_PORT NEXT_HOP_PORT``)
    on a free port; returns it and its port once it listens."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "bench" / script), str(port), str(next_hop_port)]
    )
    try:
        wait_port(port)
    except BaseException:
        proc.terminate()
        raise
    return proc, port


def measure_naive(sink: Sink, args: argparse.Namespace) -> Result:
    proc, port = start_bench_relay("naive_relay.py", sink.port)
    try:
        run_source(port, min(200, args.messages), args.sessions, args.size)
        cpu_before = proc_cpu_seconds([proc.pid])
        rate = run_source(port, args.messages, args.sessions, args.size)
        cpu = proc_cpu_seconds([proc.pid]) - cpu_before
        rss = proc_peak_rss_mb([proc.pid])
    finally:
        proc.terminate()
        proc.wait(10)
    return Result("naive relay", rate, cpu * 1000 / args.messages, rss)


def _expect(reader: BinaryIO, code: bytes) -> None:
    """Read one (possibly multi-line) reply and check its code."""
    while True:
        line = reader.readline()
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")
        if line[3:4] != b"-":
            return


# The two dialogues the latency run times. Lock-step is how smtp-source (and Postfix's
# smtpd_proxy_filter, before the queue) talk: one command, then its reply. Postfix's smtp client
# feeding a content_filter after the queue says EHLO and then, because the filter offers
# PIPELINING, sends its XFORWARD commands, MAIL, RCPT and DATA in one write.
# A third dialogue is the pipelined one with ten recipients: Postfix hands a content filter
# every recipient of a queue file (up to 50) in that one write. The minimal proxy relays one
# recipient per message, so it sits that one out.
LOCK_STEP = "lock-step"
PIPELINED = "pipelined"
PIPELINED_TEN = "pipelined, 10 recipients"


def _pipelined_steps(recipients: int) -> tuple[tuple[bytes, tuple[bytes, ...]], ...]:
    """EHLO, then XFORWARD, XFORWARD, MAIL, the RCPTs and DATA in one write, and the replies
    each write expects."""
    group = (
        b"XFORWARD NAME=mx.example.org ADDR=192.0.2.1\r\n"
        b"XFORWARD PROTO=ESMTP HELO=mx.example.org\r\n"
        b"MAIL FROM:<bench@example.org>\r\n"
        + b"".join(b"RCPT TO:<sink%d@example.net>\r\n" % n for n in range(recipients))
        + b"DATA\r\n"
    )
    return (
        (b"EHLO bench.example.org\r\n", (b"250",)),
        (group, (b"250",) * (3 + recipients) + (b"354",)),
    )


def timed_message(port: int, payload: bytes, dialogue: str = LOCK_STEP) -> float:
    """Seconds for one session (connect to the reply to QUIT). Lock-step, as smtp-source -s 1
    runs it: HELO, MAIL, RCPT, DATA, the message, QUIT. Pipelined, as Postfix hands a message
    to a content filter: EHLO, then XFORWARD, XFORWARD, MAIL, RCPT and DATA in one write, the
    message once their five replies are in, QUIT. PIPELINED_TEN: the same with ten RCPTs."""
    if dialogue == LOCK_STEP:
        steps: tuple[tuple[bytes, tuple[bytes, ...]], ...] = (
            (b"HELO bench.example.org\r\n", (b"250",)),
            (b"MAIL FROM:<bench@example.org>\r\n", (b"250",)),
            (b"RCPT TO:<sink@example.net>\r\n", (b"250",)),
            (b"DATA\r\n", (b"354",)),
        )
    else:
        steps = _pipelined_steps(1 if dialogue == PIPELINED else 10)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        _expect(reader, b"220")
        for command, codes in (*steps, (payload, (b"250",)), (b"QUIT\r\n", (b"221",))):
            sock.sendall(command)
            for code in codes:
                _expect(reader, code)
        reader.close()
    return time.perf_counter() - started


def bench_payload(size: int) -> bytes:
    """A message like smtp-source's: a few headers, then lines of X up to ``size`` bytes."""
    head = (
        b"From: <bench@example.org>\r\nTo: <sink@example.net>\r\n"
        b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-Id: <bench@example.org>\r\n\r\n"
    )
    lines: list[bytes] = []
    length = len(head)
    while length < size:
        lines.append(b"%d" % len(lines) + b"X" * 76 + b"\r\n")
        length += len(lines[-1])
    return head + b"".join(lines) + b".\r\n"


def measure_latency(workdir: Path, sink: Sink, args: argparse.Namespace, no_rules: Path) -> None:
    """One session, one message at a time: the added latency per message over the direct path.

    Two measures: the mean from smtp-source (total time of 500 messages / 500), and the median
    of per-message times from a small client of our own that alternates the paths message by
    message, so all see the same moments of a noisy machine. The target is on the median; the
    mean also carries every stall of the shared machine. Our client runs both dialogues (see
    LOCK_STEP and PIPELINED) in turn. The same alternation also times filterd with no rules
    and tests/bench/minimal_proxy.py (the least a Python proxy adds here), and reads the CPU
    time each proxy spent per message: together they split filterd's added time into the
    unavoidable part of proxying, filterd's SMTP and delivery layers, and the rules.
    """
    count = 500
    direct, filtered = [], []
    payload = bench_payload(args.size)
    proc, port = start_filterd(workdir, sink.port, REPO / "rules", 1, args.log_level)
    bare, bare_port = start_filterd(
        workdir, sink.port, no_rules, 1, args.log_level, name="filterd-bare"
    )
    minimal, minimal_port = start_bench_relay("minimal_proxy.py", sink.port)
    ports = {"direct": sink.port, "minimal": minimal_port, "bare": bare_port, "filterd": port}
    pids = {"minimal": [minimal.pid], "bare": [bare.pid], "filterd": [proc.pid]}
    times: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        for warm in (port, bare_port, minimal_port):
            run_source(warm, 50, 1, args.size)
        for _ in range(args.runs):
            direct.append(1000 / run_source(sink.port, count, 1, args.size))
            filtered.append(1000 / run_source(port, count, 1, args.size))
        for dialogue in (LOCK_STEP, PIPELINED, PIPELINED_TEN):
            targets = {
                name: target
                for name, target in ports.items()
                if dialogue != PIPELINED_TEN or name != "minimal"
            }
            times[dialogue] = {name: [] for name in targets}
            before = {name: proc_cpu_split(p) for name, p in pids.items() if name in targets}
            for _ in range(args.runs * count):
                for name, target in targets.items():
                    times[dialogue][name].append(timed_message(target, payload, dialogue) * 1000)
            cpu[dialogue] = {}
            for name, p in pids.items():
                if name not in targets:
                    continue
                after = proc_cpu_split(p)
                cpu[dialogue][name] = (after[0] - before[name][0], after[1] - before[name][1])
    finally:
        minimal.terminate()
        minimal.wait(10)
        for daemon in (proc, bare):
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    d, f = statistics.median(direct), statistics.median(filtered)
    print(
        f"\nlatency, 1 session, {args.size} B, shipped rules, median of {args.runs}: "
        f"smtp-source mean: direct {d:.2f} ms/msg, filterd {f:.2f} ms/msg, added {f - d:.2f} ms"
    )
    for dialogue, title in (
        (LOCK_STEP, "lock-step (HELO, then one command at a time, as smtp-source)"),
        (PIPELINED, "pipelined (EHLO; XFORWARD x2, MAIL, RCPT, DATA in one write, as Postfix)"),
        (PIPELINED_TEN, "pipelined with 10 RCPTs (as Postfix hands a multi-recipient message)"),
    ):
        print_dialogue(title, times[dialogue], cpu[dialogue])


def print_dialogue(
    title: str, times: dict[str, list[float]], cpu: dict[str, tuple[float, float]]
) -> None:
    """The latency run's lines for one dialogue: medians, the split, CPU per message."""
    md, mf = statistics.median(times["direct"]), statistics.median(times["filterd"])
    qd = statistics.quantiles(times["direct"], n=10)
    qf = statistics.quantiles(times["filterd"], n=10)
    print(
        f"{title}, per message ({len(times['filterd'])} each, alternating): median direct "
        f"{md:.2f} ms, filterd {mf:.2f} ms, added {mf - md:.2f} ms "
        f"(p10/p90 direct {qd[0]:.2f}/{qd[-1]:.2f}, filterd {qf[0]:.2f}/{qf[-1]:.2f})"
    )
    for name, label in (
        ("bare", "filterd with no rules"),
        ("minimal", "minimal Python proxy (tests/bench/minimal_proxy.py)"),
    ):
        if name not in times:
            continue  # the minimal proxy relays one recipient per message
        m = statistics.median(times[name])
        print(f"  {label}, same client and alternation: median {m:.2f} ms, added {m - md:.2f} ms")
    messages = len(times["filterd"])
    print(
        "  CPU per message, user + system: "
        + ", ".join(
            f"{label} {(cpu[name][0] + cpu[name][1]) * 1000 / messages:.2f} ms "
            f"({cpu[name][0] * 1000 / messages:.2f} + {cpu[name][1] * 1000 / messages:.2f})"
            for name, label in (
                ("minimal", "minimal proxy"),
                ("bare", "filterd no rules"),
                ("filterd", "filterd shipped rules"),
            )
            if name in cpu
        )
    )


_SENDER = """
import smtplib, sys, time, pathlib
port, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
raw = pathlib.Path(path).read_bytes()
if mode == "once":
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as smtp:
        smtp.sendmail("a@example.org", ["b@example.net"], raw)
else:
    stop = pathlib.Path(mode)
    while not stop.exists():
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            smtp.sendmail("a@example.org", ["b@example.net"], raw)
        print(round((time.perf_counter() - started) * 1000, 2), flush=True)
"""


def big_message(size: int) -> bytes:
    """About ``size`` bytes of mail as large mail is: a short text and one base64 attachment
    (random bytes behind a PDF signature), which the rules decode in full to type and size it."""
    head = (
        b"From: <bench@example.org>\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=bench\r\n\r\n"
        b"--bench\r\nContent-Type: text/plain\r\n\r\nThe report is attached.\r\n"
        b"--bench\r\nContent-Type: application/pdf; name=report.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    payload = b"%PDF-1.4\n" + random.Random(7).randbytes(size * 3 // 4)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return head + encoded + b"--bench--\r\n"


def measure_large(workdir: Path, sink: Sink, args: argparse.Namespace) -> None:
    """10 clients send a 20 MB message at once while another sends small ones: peak RSS growth
    of filterd and the small messages' latency. Every client is its own process, so the
    clients do not slow each other down (smtplib holds the GIL while it dot-stuffs 20 MB).

    ``--large-sink`` picks the next hop: ``smtp-sink`` drains one connection until its socket is
    empty, so under 10 concurrent 20 MB transfers a small transaction on another connection
    waits behind megabytes of queued data; ``fair`` (tests/bench/fair_sink.py) reads every
    connection in turn, as a real next hop with a process per connection does. ``both`` runs
    the measurement once per sink."""
    import threading

    big = workdir / "big.eml"
    big.write_bytes(big_message(20 * 1024 * 1024))
    small = workdir / "small.eml"
    small.write_bytes(b"Subject: small\r\n\r\n" + b"z" * 2000 + b"\r\n")

    def sample(proc: subprocess.Popen[bytes], peak: list[float], sampling: threading.Event) -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_mb(family(proc.pid)))
            time.sleep(0.02)

    def sender(port: int, path: Path, mode: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(port), str(path), mode],
            stdout=subprocess.PIPE,
            text=True,
        )

    sinks = {"smtp-sink": ["smtp-sink"], "fair": ["fair"], "both": ["smtp-sink", "fair"]}
    for which in sinks[args.large_sink]:
        fair: subprocess.Popen[bytes] | None = None
        if which == "fair":
            label, relay_port = "fair asyncio sink", free_port()
            fair = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "bench" / "fair_sink.py"), str(relay_port)]
            )
            wait_port(relay_port)
        else:
            label, relay_port = "smtp-sink", sink.port
        stop_file = workdir / f"stop-small-{which}"
        config = workdir / "large.yaml"
        port = free_port()
        config.write_text(
            f"listen: 127.0.0.1:{port}\nrelay: 127.0.0.1:{relay_port}\nrules: {REPO / 'rules'}\n"
            f"state_dir: {workdir / f'state-large-{which}'}\nmetrics: {{listen: null}}\n"
            f"log: {{level: {args.log_level}, format: json}}\nworkers: {args.workers}\n"
            f"limits: {{max_message_size: 30M, spool_threshold: 1M}}\n"
        )
        proc = start_daemon(config, workdir / f"large-{which}.log")
        peak = [0.0]
        sampling = threading.Event()
        try:
            wait_daemon(proc, port, workdir / f"large-{which}.log")
            time.sleep(1.0)
            subprocess.run(
                [sys.executable, "-c", _SENDER, str(port), str(small), "once"], check=True
            )
            baseline = rss_mb(family(proc.pid))
            sampler = threading.Thread(target=sample, args=(proc, peak, sampling))
            sampler.start()
            smalls = sender(port, small, str(stop_file))
            time.sleep(0.5)
            started = time.perf_counter()
            bigs = [sender(port, big, "once") for _ in range(10)]
            codes = [b.wait(600) for b in bigs]
            elapsed = time.perf_counter() - started
            stop_file.write_text("")
            out, _ = smalls.communicate(timeout=120)
            sampling.set()
            sampler.join()
        finally:
            sampling.set()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            if fair is not None:
                fair.terminate()
                fair.wait(10)
        lat = sorted(float(line) for line in out.split())
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        print(
            f"\nlarge (next hop: {label}): 10 x 20 MB at once in {elapsed:.1f} s "
            f"(failed senders: {sum(1 for c in codes if c)}), "
            f"workers={args.workers}; filterd RSS {baseline:.0f} MB before, peak {peak[0]:.0f} MB "
            f"(+{peak[0] - baseline:.0f} MB); {len(lat)} small messages meanwhile, "
            f"median {statistics.median(lat) if lat else float('nan'):.0f} ms, p99 {p99:.0f} ms",
            flush=True,
        )


def interpreter_label() -> str:
    """Which Python runs filterd and the Python proxies (this one): the build matters.

    An interpreter built without profile-guided optimisation and with a shared libpython (the
    default of a source build such as pyenv's) made filterd spend 14-28% more CPU per message
    here than Debian's own python3.11 (PGO and LTO, statically linked), which is what a Debian
    12 server runs. Run the benchmark from a venv of the interpreter you deploy with.
    """
    uvloop = "uvloop" if importlib.util.find_spec("uvloop") else "no uvloop (asyncio's loop)"
    return (
        f"Python {platform.python_version()} at {os.path.realpath(sys.executable)} "
        f"({platform.python_compiler()}), {uvloop}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--only", help="comma-separated subset: direct,naive,empty,shipped,regex1000,latency,large"
    )
    parser.add_argument(
        "--log-level",
        choices=("warning", "info"),
        default="warning",
        help="filterd's log level: warning (default: no line per message, as in every earlier "
        "round) or info (the shipped config: one JSON line per message)",
    )
    parser.add_argument(
        "--large-sink",
        choices=("smtp-sink", "fair", "both"),
        default="both",
        help="next hop for 'large': Postfix smtp-sink, tests/bench/fair_sink.py, or each in turn",
    )
    args = parser.parse_args()
    print(interpreter_label(), flush=True)
    # Every message through a proxy wakes sleeping processes; what that costs depends on
    # how the CPUs idle and on the host, and it moves every latency figure below: printed
    # with them, so that runs on different machines (or days) can be told apart.
    print(idle_policy(), flush=True)
    wall, _ = ping_pong(2000, None)
    print(
        f"host wake-up cost (bench_wakeup.py): write waking a reader "
        f"{write_waking_a_reader(2000):.1f} µs CPU, round trip {wall:.1f} µs",
        flush=True,
    )
    wanted = set((args.only or "direct,naive,empty,shipped,regex1000,latency,large").split(","))

    workdir = Path(tempfile.mkdtemp(prefix="filterd-bench-"))
    empty = workdir / "empty.yaml"
    empty.write_text("rules: []\n")
    many = workdir / "many"
    many.mkdir()
    for item in (REPO / "rules").iterdir():
        target = many / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy(item, target)
    (many / "zz-generated.yaml").write_text(regex_rules(1000))

    runs: dict[str, list[Result]] = {}
    sink = Sink()
    try:
        for _ in range(args.runs):
            if "direct" in wanted:
                runs.setdefault("direct", []).append(
                    Result("direct", run_source(sink.port, args.messages, args.sessions, args.size))
                )
            if "naive" in wanted:
                runs.setdefault("naive", []).append(measure_naive(sink, args))
            if "empty" in wanted:
                runs.setdefault("empty", []).append(
                    measure_filterd("filterd, 0 rules", workdir, sink, empty, args)
                )
            if "shipped" in wanted:
                runs.setdefault("shipped", []).append(
                    measure_filterd("filterd, shipped rules", workdir, sink, REPO / "rules", args)
                )
            if "regex1000" in wanted:
                runs.setdefault("regex1000", []).append(
                    measure_filterd("filterd, shipped + 1,000 regex", workdir, sink, many, args)
                )
        print_table(runs, args)
        if "latency" in wanted:
            measure_latency(workdir, sink, args, empty)
        if "large" in wanted:
            measure_large(workdir, sink, args)
    finally:
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(runs: dict[str, list[Result]], args: argparse.Namespace) -> None:
    if not runs:
        return
    direct = statistics.median(r.rate for r in runs["direct"]) if "direct" in runs else None
    print(
        f"\n{args.messages} messages of {args.size} B, {args.sessions} sessions, new connection per message, "
        f"median of {args.runs} runs, filterd workers={args.workers}, {os.cpu_count()} CPUs, "
        f"log level {args.log_level}"
    )
    print(f"{'path':34} {'msg/s':>9} {'vs direct':>10} {'CPU ms/msg':>11} {'peak RSS MB':>12}")
    for results in runs.values():
        rate = statistics.median(r.rate for r in results)
        cpu = [r.cpu_ms for r in results if r.cpu_ms is not None]
        rss = [r.rss_mb for r in results if r.rss_mb is not None]
        ratio = f"{rate / direct:.1%}" if direct else "-"
        print(
            f"{results[0].name:34} {rate:9.0f} {ratio:>10} "
            f"{statistics.median(cpu) if cpu else float('nan'):11.2f} {max(rss) if rss else float('nan'):12.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
