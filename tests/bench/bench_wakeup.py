"""What a socket write and a round trip cost on this machine, without any SMTP.

Every reply filterd writes wakes a process that sleeps waiting for it (the client, or the next
hop). On a virtual machine waking a process on another CPU can cost the writer tens of
microseconds, which is why the number of writes per message matters as much as the Python
work. This prints, over loopback TCP with plain blocking sockets:

- a write nobody waits for (the reader drains now and then);
- a write to a reader that sleeps in ``recv`` in another thread (a wake-up per write);
- a ping-pong between two processes, across CPUs and (where the machine has two) on one CPU.

The first line says how the kernel idles its CPUs. On a KVM guest with the ``haltpoll`` idle
driver, ``guest_halt_poll_ns`` is how long an idle CPU polls before it halts: a CPU that
halted is woken through the hypervisor (a VM exit), one still polling is not. With it at 0
every wake-up of an idle CPU takes the slow way (see docs/performance.md, "The host").

``python tests/bench/bench_wakeup.py [--count 5000]``
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from pathlib import Path

REPLY = b"250 2.0.0 Ok\r\n"


def idle_policy(root: Path = Path("/sys")) -> str:
    """How this machine's CPUs idle: the cpuidle driver and governor, and the guest's halt
    polling where the haltpoll driver runs; "unknown" where the kernel does not say."""

    def read(path: str) -> str | None:
        try:
            return (root / path).read_text().strip()
        except OSError:
            return None

    driver = read("devices/system/cpu/cpuidle/current_driver")
    if driver is None:
        return "cpuidle: unknown"
    governor = read("devices/system/cpu/cpuidle/current_governor") or read(
        "devices/system/cpu/cpuidle/current_governor_ro"
    )
    text = f"cpuidle: driver {driver}, governor {governor or 'unknown'}"
    poll = read("module/haltpoll/parameters/guest_halt_poll_ns")
    if driver == "haltpoll" and poll is not None:
        text += f", guest_halt_poll_ns {poll}"
        if poll == "0":
            text += " (idle CPUs halt at once: every wake-up of one is a VM exit)"
    return text


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def write_nobody_waits_for(count: int) -> float:
    """CPU µs per write when the reader is not blocked (it drains every 50 writes)."""
    writer, reader = _connected_pair()
    with writer, reader:
        started = time.thread_time()
        for i in range(count):
            writer.send(REPLY)
            if i % 50 == 49:
                reader.recv(1 << 20)
        return (time.thread_time() - started) / count * 1e6


def write_waking_a_reader(count: int) -> float:
    """CPU µs per write when a thread sleeps in recv() for each one."""
    writer, reader = _connected_pair()

    def drain() -> None:
        while reader.recv(65536):
            pass

    thread = threading.Thread(target=drain)
    thread.start()
    with writer, reader:
        started = time.thread_time()
        for _ in range(count):
            writer.send(REPLY)
            time.sleep(0)  # let the reader go back to sleep before the next write
        cpu = (time.thread_time() - started) / count * 1e6
        writer.shutdown(socket.SHUT_WR)
        thread.join()
    return cpu


def ping_pong(count: int, cpus: tuple[int, int] | None) -> tuple[float, float]:
    """Wall and CPU µs per round trip between this process and a forked echo process, each
    pinned to the given CPUs (None: wherever the scheduler puts them)."""
    client, server = _connected_pair()
    child = os.fork()
    if child == 0:  # the echo side
        client.close()
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[1]})
        while server.recv(65536):
            server.send(b"x")
        os._exit(0)
    server.close()
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    with client:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            client.send(REPLY)
            client.recv(16)
        result = (
            (time.perf_counter() - wall) / count * 1e6,
            (time.process_time() - cpu) / count * 1e6,
        )
        client.shutdown(socket.SHUT_WR)
    os.waitpid(child, 0)
    if cpus is not None:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    print(idle_policy())
    print(f"write, nobody waiting:      {write_nobody_waits_for(args.count * 4):6.1f} µs CPU")
    print(f"write, waking a reader:     {write_waking_a_reader(args.count):6.1f} µs CPU")
    wall, cpu = ping_pong(args.count, None)
    print(f"round trip, unpinned:       {wall:6.1f} µs ({cpu:.1f} µs CPU on this side)")
    if (os.cpu_count() or 1) >= 2:
        wall, cpu = ping_pong(args.count, (0, 1))
        print(f"round trip, CPUs 0 and 1:   {wall:6.1f} µs ({cpu:.1f} µs CPU on this side)")
        wall, cpu = ping_pong(args.count, (0, 0))
        print(f"round trip, both on CPU 0:  {wall:6.1f} µs ({cpu:.1f} µs CPU on this side)")


if __name__ == "__main__":
    main()
