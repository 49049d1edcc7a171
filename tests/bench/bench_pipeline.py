"""Per-message CPU cost of the whole pipeline (parse + evaluate) on a realistic mixed corpus.

A deterministic corpus of about 200 messages from 2 KB to 1 MB is generated — plain text,
8-bit UTF-8, multipart/alternative with HTML, PDF and image attachments, RFC 2047 headers,
zip attachments — plus every message of tests/corpus. Each is evaluated from its raw bytes (as
the daemon does) with the shipped rules plus 1,000 generated regex rules (headers and body),
and the mean CPU time per message is printed. The goal: at most 5 ms per message.

    python tests/bench/bench_pipeline.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from filterd.model import Envelope, Message  # noqa: E402
from filterd.rules import evaluate, load_ruleset  # noqa: E402
from tests.bench.bench_smtp import regex_rules  # noqa: E402

GOAL_MS = 5.0
WORDS = [
    "invoice",
    "meeting",
    "schedule",
    "report",
    "quarterly",
    "budget",
    "team",
    "project",
    "update",
    "review",
    "draft",
    "Grüße",
    "Müller",
    "naïve",
    "café",
    "straße",
    "東京",
    "données",
    "résumé",
]


def text(rng: random.Random, size: int) -> str:
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        out.append(line)
        n += len(line.encode()) + 2
    return "\r\n".join(out)


def b64(data: bytes) -> str:
    raw = base64.b64encode(data).decode()
    return "\r\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))


def make_message(rng: random.Random, index: int) -> bytes:
    size = int(2000 * (500 ** rng.random()))  # 2 KB .. 1 MB, log-uniform
    kind = index % 5
    head = (
        f"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <sender{index}@example.org>\r\n"
        f"To: rcpt{index}@example.net\r\nSubject: =?utf-8?b?{base64.b64encode(f'Bericht {index} für Q3'.encode()).decode()}?=\r\n"
        f"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <m{index}@example.org>\r\nMIME-Version: 1.0\r\n"
    )
    if kind == 0:
        return (
            head
            + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + text(rng, size)
            + "\r\n"
        ).encode()
    if kind == 1:
        body = text(rng, size // 2)
        html = (
            "<html><body>"
            + "".join(
                f"<p>{line} <a href='https://docs.example.com/{i}'>link</a></p>"
                for i, line in enumerate(body.split("\r\n"))
            )
            + "</body></html>"
        )
        return (
            head + 'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n--b1\r\n'
            "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n--b1\r\n"
            "Content-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--b1--\r\n"
        ).encode()
    if kind == 2:
        pdf = b"%PDF-1.4\n" + bytes(rng.getrandbits(8) for _ in range(size))
        return (
            head + 'Content-Type: multipart/mixed; boundary="b2"\r\n\r\n--b2\r\n'
            "Content-Type: text/plain; charset=utf-8\r\n\r\n" + text(rng, 800) + "\r\n--b2\r\n"
            'Content-Type: application/pdf; name="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
            'Content-Disposition: attachment; filename="report.pdf"\r\n\r\n'
            + b64(pdf)
            + "\r\n--b2--\r\n"
        ).encode()
    if kind == 3:
        png = b"\x89PNG\r\n\x1a\n" + bytes(rng.getrandbits(8) for _ in range(size))
        return (
            head + 'Content-Type: multipart/related; boundary="b3"\r\n\r\n--b3\r\n'
            "Content-Type: text/html; charset=utf-8\r\n\r\n<p>"
            + text(rng, 600)
            + "</p>\r\n--b3\r\n"
            'Content-Type: image/png; name="chart.png"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            + b64(png)
            + "\r\n--b3--\r\n"
        ).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(5):
            archive.writestr(f"doc{n}.txt", text(rng, size // 5))
    return (
        head + 'Content-Type: multipart/mixed; boundary="b4"\r\n\r\n--b4\r\n'
        "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        "Gr=FC=DFe aus M=FCnchen\r\n--b4\r\n"
        'Content-Type: application/zip; name="docs.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + b64(buffer.getvalue())
        + "\r\n--b4--\r\n"
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(20261130)
    corpus = [make_message(rng, i) for i in range(args.messages)]
    corpus += [p.read_bytes() for p in sorted((REPO / "tests" / "corpus").glob("*.eml"))]
    workdir = Path(tempfile.mkdtemp(prefix="filterd-pipeline-"))
    rules = workdir / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "zz-generated.yaml").write_text(regex_rules(1000))
    ruleset = load_ruleset(rules)
    envelope = Envelope(
        sender="sender@example.org",
        recipients=("rcpt@example.net",),
        client_ip="192.0.2.1",
        helo="mx.example.org",
    )
    messages = [Message(envelope, raw) for raw in corpus]
    sizes = sorted(len(m.raw) for m in messages)
    best = float("inf")
    for _ in range(args.rounds):
        started = time.process_time()
        for message in messages:
            evaluate(ruleset, message)
        best = min(best, (time.process_time() - started) / len(messages) * 1000)
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{len(messages)} messages ({sizes[0]} B .. {sizes[-1]} B, median {sizes[len(sizes) // 2]} B), "
        f"{len(ruleset.rule_names)} rules: {best:.2f} ms CPU per message (parse + evaluate), "
        f"best of {args.rounds} rounds; goal <= {GOAL_MS} ms"
    )


if __name__ == "__main__":
    main()
