"""The benchmark's reference proxy (tests/bench/minimal_proxy.py) must not hang the benchmark:
a reply that arrives before the command waiting for it is kept, and a next hop that goes away
fails the waiting command instead of leaving it waiting for ever. Both dialogues of the latency
run get through it, its replies to a pipelined group in one write. The benchmarks' report of
how the CPUs idle reads what the kernel says, and the instruction count reads callgrind's."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.bench import count_instructions
from tests.bench.bench_smtp import (
    LOCK_STEP,
    PIPELINED,
    PIPELINED_TEN,
    bench_payload,
    timed_message,
)
from tests.bench.bench_wakeup import idle_policy
from tests.bench.minimal_proxy import NextHop, Proxy
from tests.support.nexthop import NextHop as SinkNextHop


def test_a_reply_that_comes_before_its_command_is_kept() -> None:
    async def run() -> list[bytes]:
        hop = NextHop()
        # The greeting can be read in the same pass of the event loop that made the
        # connection, before connect() asks for it.
        hop.data_received(b"220 sink ESMTP\r\n")
        return await asyncio.wait_for(hop.command(b"", 1), 5)

    assert asyncio.run(run()) == [b"220 sink ESMTP\r"]


def test_replies_are_taken_in_order_across_commands() -> None:
    async def run() -> tuple[list[bytes], list[bytes]]:
        hop = NextHop()
        hop.data_received(b"250-first\r\n250 last\r\n250 2.1.0 Ok\r\n")
        first = await asyncio.wait_for(hop.command(b"", 1), 5)
        second = await asyncio.wait_for(hop.command(b"", 1), 5)
        return first, second

    assert asyncio.run(run()) == ([b"250 last\r"], [b"250 2.1.0 Ok\r"])


def test_a_lost_next_hop_fails_the_waiting_command() -> None:
    async def run() -> None:
        hop = NextHop()
        waiting = asyncio.ensure_future(hop.command(b"", 1))
        await asyncio.sleep(0)
        hop.connection_lost(None)
        await asyncio.wait_for(waiting, 5)

    with pytest.raises(ConnectionError):
        asyncio.run(run())


def test_both_latency_dialogues_get_through_the_minimal_proxy(nexthop: SinkNextHop) -> None:
    writes: list[bytes] = []

    class RecordingProxy(Proxy):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            write = self.transport.write

            def recording_write(data: bytes) -> None:
                writes.append(bytes(data))
                write(data)

            self.transport = _WriteThrough(self.transport, recording_write)

    async def main() -> None:
        Proxy.next_hop_port = nexthop.port
        loop = asyncio.get_running_loop()
        server = await loop.create_server(RecordingProxy, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for dialogue in (LOCK_STEP, PIPELINED):
                seconds = await loop.run_in_executor(
                    None, timed_message, port, bench_payload(2000), dialogue
                )
                assert seconds > 0
        finally:
            server.close()
            for hop in Proxy.idle:
                hop.transport.close()
            Proxy.idle.clear()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert len(nexthop.wait_for(2)) == 2
    # The pipelined group's four 250s and the 354 went out together.
    assert any(w.count(b"\r\n") == 5 and w.endswith(b"<CR><LF>.<CR><LF>\r\n") for w in writes)


def test_the_ten_recipient_dialogue_reaches_a_next_hop(nexthop: SinkNextHop) -> None:
    # The latency run times it on the direct path and through filterd; here, against the
    # tests' next hop, as the direct path.
    assert timed_message(nexthop.port, bench_payload(2000), PIPELINED_TEN) > 0
    [received] = nexthop.wait_for(1)
    assert received.recipients == [f"sink{n}@example.net" for n in range(10)]


class _WriteThrough:
    """A transport whose write is replaced; everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, write: object) -> None:
        self._transport = transport
        self.write = write

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


def test_the_idle_policy_names_the_driver_and_the_guest_halt_polling(tmp_path: Path) -> None:
    cpuidle = tmp_path / "devices/system/cpu/cpuidle"
    cpuidle.mkdir(parents=True)
    (cpuidle / "current_driver").write_text("haltpoll\n")
    (cpuidle / "current_governor_ro").write_text("haltpoll\n")
    params = tmp_path / "module/haltpoll/parameters"
    params.mkdir(parents=True)
    (params / "guest_halt_poll_ns").write_text("0\n")
    text = idle_policy(tmp_path)
    assert text.startswith("cpuidle: driver haltpoll, governor haltpoll, guest_halt_poll_ns 0")
    assert "VM exit" in text
    (params / "guest_halt_poll_ns").write_text("200000\n")
    assert idle_policy(tmp_path) == (
        "cpuidle: driver haltpoll, governor haltpoll, guest_halt_poll_ns 200000"
    )
    (cpuidle / "current_driver").write_text("intel_idle\n")
    (cpuidle / "current_governor").write_text("menu\n")
    assert idle_policy(tmp_path) == "cpuidle: driver intel_idle, governor menu"
    assert idle_policy(tmp_path / "missing") == "cpuidle: unknown"


def test_the_instruction_count_reads_callgrinds_summary() -> None:
    summary = b"==1== Events    : Ir\n==1== Collected : 831829608\n==1==\n"
    assert count_instructions._collected(summary) == 831_829_608
    with pytest.raises(RuntimeError, match="no instruction count"):
        count_instructions._collected(b"valgrind: command not found\n")


def test_the_counted_evaluation_runs_on_the_shipped_rules() -> None:
    # What count_instructions hands to callgrind, run without it: it must not rot as the rule
    # engine changes.
    repo = Path(count_instructions.__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", count_instructions._EVALUATE, str(repo / "rules"), "3"],
        cwd=repo,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def _annotated(format_calls: int, traceback_calls: int) -> str:
    """A ``callgrind_annotate --tree=caller`` listing of the shape the tool reads."""
    return textwrap.dedent(
        f"""\
        --------------------------------------------------------------------------------
        Ir                     file:function
        --------------------------------------------------------------------------------
        {format_calls * 1_600:,} ( 0.69%)  < ???:0x602ad0 ({format_calls:,}x) [python3.11]
        30 ( 0.01%)  < ???:_PyNumber_Index (3x) [python3.11]
        {format_calls * 100:,} ( 0.05%)  *  ???:PyErr_Format [python3.11]
        {format_calls * 1_500:,} ( 0.60%)  >   ???:PyUnicode_FromFormatV (1x) [python3.11]

        {traceback_calls * 2_400:,} ( 0.97%)  < ???:Eval'2 ({traceback_calls:,}x) [python3.11]
        {traceback_calls * 200:,} ( 0.10%)  *  ???:PyTraceBack_Here [python3.11]

        83,443,000 ( 4.00%)  *  ???:bool re2::DFA::Loop<false, true>(re2::Params*) [_re2.so]
        """
    )


def test_the_breakdown_reads_callgrinds_call_tree_per_message() -> None:
    long = count_instructions.parse_call_tree(_annotated(7_000, 5_000))
    short = count_instructions.parse_call_tree(_annotated(2_000, 1_000))
    assert long.own["???:PyErr_Format"] == 700_000
    assert long.own["???:bool re2::DFA::Loop<false, true>(re2::Params*)"] == 83_443_000
    assert long.callers["???:PyErr_Format"]["???:0x602ad0"] == (7_000, 11_200_000)
    assert long.callers["???:PyTraceBack_Here"] == {"???:Eval'2": (5_000, 12_000_000)}
    report = count_instructions.breakdown(long, short, 1_000, top=2, callers="PyErr_Format")
    lines = report.splitlines()
    # Per extra message: the functions by their own instructions, the costliest first ...
    assert lines[1].split() == ["800", "???:PyTraceBack_Here"]
    assert lines[2].split() == ["500", "???:PyErr_Format"]
    assert "re2" not in report  # the same in both runs: no per-message cost
    # ... and who called the matching function, how often and at what cost, per message (a
    # caller with as many calls in both runs, start-up's, is left out).
    assert lines[3:] == [
        "  callers of ???:PyErr_Format (calls and their instructions, per message):",
        "      5.00 x      8,000  ???:0x602ad0",
    ]
