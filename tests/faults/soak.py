"""The soak driver: client threads that send token-marked messages through filterd the way an
MTA does (retry after 4xx, give up after 5xx), and a next hop that misbehaves at random.

Used by test_accounting_soak.py for the short CI run, the opt-in long run and the kill -9 run.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field

from tests.faults.accounting import Ledger, message
from tests.support.faultclient import RawClient, ServerClosed
from tests.support.nexthop import Fault

MAX_TRIES = 12


def transaction_faults(timeout: float) -> list[tuple[float, Fault]]:
    """(weight, fault) for one transaction at the next hop: every stage, every kind."""
    slow = timeout + 0.5  # longer than filterd waits
    faults: list[tuple[float, Fault]] = []
    for stage in ("mail", "rcpt", "data", "mid-data", "dot"):
        faults.append((3, Fault(stage, "close")))
    for stage in ("mail", "rcpt", "data", "dot"):
        faults.append((2, Fault(stage, "shutdown")))
        faults.append((0.25, Fault(stage, "stall", seconds=slow)))
    for stage, temp, perm in (
        ("mail", "451 4.3.0 busy", "550 5.7.1 sender refused"),
        ("rcpt", "450 4.2.1 busy", "550 5.1.1 unknown user"),
        ("data", "451 4.3.0 later", "554 5.5.1 no"),
        ("dot", "451 4.3.0 queue trouble", "554 5.7.1 refused"),
    ):
        faults.append((3, Fault(stage, "reply", temp)))
        faults.append((0.5, Fault(stage, "reply", perm)))
    faults.append((2, Fault("mail", "trickle", seconds=0.0005)))
    # the final reply comes after filterd gave up: delivered, yet the client was told 4xx
    faults.append((0.4, Fault("dot", "late", seconds=slow)))
    return faults


def connection_faults(timeout: float) -> list[tuple[float, Fault]]:
    return [
        (3, Fault("greeting", "close")),
        (2, Fault("greeting", "reply", "421 4.3.2 busy")),
        (1, Fault("greeting", "reply", "554 5.3.2 no service")),
        (0.3, Fault("greeting", "stall", seconds=timeout + 0.5)),
        (1, Fault("greeting", "trickle", seconds=0.0005)),
    ]


class FaultPlan:
    """A ``Behaviour.faults`` callable: a fault for ``rate`` of connections and transactions."""

    def __init__(self, seed: int, rate: float, timeout: float) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.table = {
            "transaction": transaction_faults(timeout),
            "connect": connection_faults(timeout),
        }
        self.lock = threading.Lock()

    def __call__(self, point: str) -> Fault | None:
        with self.lock:
            if self.rng.random() >= self.rate:
                return None
            table = self.table[point]
            fault: Fault = self.rng.choices([f for _, f in table], [w for w, _ in table])[0]
            return fault


@dataclass
class SoakClient:
    """One sending thread: a long-lived session, reconnected when it breaks."""

    port: int
    ledger: Ledger
    tokens: list[str]
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    errors: Counter[str] = field(default_factory=Counter)
    _client: RawClient | None = None

    def session(self) -> RawClient:
        if self._client is None:
            self._client = RawClient(self.port, timeout=30)
            if self._client.greeting.code != 220 or self._client.ehlo().code != 250:
                self.drop()
                raise ServerClosed("no service")
        return self._client

    def drop(self) -> None:
        if self._client is not None:
            self._client.abort()
            self._client = None

    def send(self, token: str, kind: str, rng: random.Random) -> None:
        subject = {
            "relay": "soak",
            "quarantine": "soak quarantine-me",
            "discard": "soak discard-me",
        }[kind]
        recipients = ["rcpt@example.net", "other@example.net"][: rng.choice((1, 1, 2))]
        body = message(token, subject, body=b"soak line\r\n" * rng.randint(1, 40))
        for _ in range(MAX_TRIES):
            if self.stop.is_set():
                return
            stage = "connect"
            try:
                client = self.session()
                stage = "mail"
                reply = client.command("MAIL FROM:<sender@example.org>")
                if reply.code == 250:
                    accepted = 0
                    stage = "rcpt"
                    for rcpt in recipients:
                        reply = client.command(f"RCPT TO:<{rcpt}>")
                        accepted += reply.code == 250
                    if accepted:
                        stage = "data"
                        reply = client.command("DATA")
                        if reply.code == 354:
                            stage = "final"
                            client.send(_stuffed(body))
                            reply = client.read_reply()
                self.ledger.record(token, stage, reply.code)
                if stage == "final" and reply.code == 250:
                    return
                if reply.code == 421:
                    self.drop()  # 421 means the server is closing: do as an MTA does
                elif stage != "final":
                    client.command("RSET")  # end the half-open transaction before the next
                if reply.code >= 500:
                    return  # refused for good: the MTA bounces it; nothing to deliver
            except (OSError, ServerClosed) as exc:
                self.errors[type(exc).__name__] += 1
                self.ledger.record(token, stage, 0)
                self.drop()

    def run(self) -> None:
        rng = random.Random(self.seed)
        try:
            for token in self.tokens:
                if self.stop.is_set():
                    return
                kind = rng.choices(("relay", "quarantine", "discard"), (90, 6, 4))[0]
                self.ledger.expect(token, kind)
                self.send(token, kind, rng)
        finally:
            if self._client is not None:
                self._client.quit()


def _stuffed(body: bytes) -> bytes:
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n"


def run_clients(
    port: int, ledger: Ledger, count: int, threads: int, prefix: str, seed: int
) -> list[SoakClient]:
    """Send ``count`` messages over ``threads`` sessions; returns the finished clients."""
    tokens = [f"{prefix}-{i}" for i in range(count)]
    clients = [SoakClient(port, ledger, tokens[i::threads], seed + i) for i in range(threads)]
    workers = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return clients
