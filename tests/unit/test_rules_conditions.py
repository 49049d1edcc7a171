"""Every condition of the rule language, matched and not matched, on one realistic message.

Each case is a one-rule rule set compiled from YAML (the real loader) and evaluated on the
message below, whose content covers every field: envelope, RFC 2047 subject, address lists,
quoted-printable text, HTML with a deceptive link, an RFC 2231-named PDF and a zip holding an
executable.
"""

from __future__ import annotations

import base64
import io
import textwrap
import zipfile
from pathlib import Path

import pytest

from filterd.model import Envelope, Message
from filterd.rules import evaluate, load_ruleset


def _zip(members: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return base64.encodebytes(buffer.getvalue()).decode()


RAW = (
    (
        'From: "Alice Example" <alice@example.org>\n'
        "To: Bob <bob@example.net>, carol@example.com\n"
        "Subject: =?utf-8?q?Caf=C3=A9_meeting?=\n"
        "Date: Mon, 30 Nov 2026 09:00:00 +0000\n"
        "Message-ID: <m1@example.org>\n"
        "X-Mailer: TestMailer 1.0\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="outer"\n'
        "\n"
        "--outer\n"
        'Content-Type: multipart/alternative; boundary="alt"\n'
        "\n"
        "--alt\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: quoted-printable\n"
        "\n"
        "Hello Bob, the agenda is at https://docs.example.com/agenda =E2=80=93 see you.\n"
        "--alt\n"
        "Content-Type: text/html; charset=utf-8\n"
        "\n"
        '<p>Hello <b>Bob</b>, <a href="https://tracker.example.net/c?id=1">www.example.com</a></p>\n'
        "--alt--\n"
        "--outer\n"
        "Content-Type: application/pdf\n"
        "Content-Disposition: attachment; filename*=utf-8''R%C3%A9sum%C3%A9.pdf\n"
        "Content-Transfer-Encoding: base64\n"
        "\n" + base64.encodebytes(b"%PDF-1.4\n%%EOF\n").decode() + "--outer\n"
        "Content-Type: application/zip\n"
        'Content-Disposition: attachment; filename="bundle.zip"\n'
        "Content-Transfer-Encoding: base64\n"
        "\n"
        + _zip({"inner/readme.txt": b"hello", "inner/tool.exe": b"MZ" + b"\0" * 100})
        + "--outer--\n"
    )
    .replace("\n", "\r\n")
    .encode()
)

ENVELOPE = Envelope(
    sender="alice@example.org",
    recipients=("bob@example.net", "carol@example.com"),
    client_ip="192.0.2.10",
    helo="mail.example.org",
)


def _matches(tmp_path: Path, condition: str, message: Message | None = None) -> bool:
    (tmp_path / "lists").mkdir(exist_ok=True)
    (tmp_path / "lists" / "people.txt").write_text("# people\nALICE@example.org\n\nexample.net\n")
    (tmp_path / "lists" / "nets.txt").write_text("192.0.2.0/24  # documentation net\n")
    (tmp_path / "lists" / "subdomains.txt").write_text(".example.com\n")
    (tmp_path / "rules.yaml").write_text(
        textwrap.dedent("""\
        lists:
          people: lists/people.txt
          nets: lists/nets.txt
          subdomains: lists/subdomains.txt
        rules:
          - name: probe
            if: %s
            then: {score: 1}
        """)
        % condition
    )
    ruleset = load_ruleset(tmp_path / "rules.yaml")
    verdict = evaluate(ruleset, message or Message(ENVELOPE, RAW))
    assert verdict.trace[0].matched == (verdict.rules == ("probe",))
    return verdict.rules == ("probe",)


CASES = [
    # envelope
    ("{sender: {equals: alice@example.org}}", True),
    ("{sender: {equals: bob@example.net}}", False),
    ("{sender: {domain: {equals: example.org}}}", True),
    ("{sender: {in: [example.org]}}", True),  # an address condition's list entry may be a domain
    ("{sender: {in: [other.example]}}", False),
    ("{sender: {in_list: people}}", True),  # listed as ALICE@example.org: case-insensitive
    ("{recipient: {domain: {equals: example.com}}}", True),  # any recipient
    ("{recipient: {address: {glob: '*@example.net'}}}", True),
    ("{recipient: {in_list: people}}", True),  # example.net is listed
    ("{recipient: {equals: dave@example.net}}", False),
    ("{client_ip: {in: [192.0.2.0/24]}}", True),
    ("{client_ip: {in: [10.0.0.0/8, 'fd00::/8']}}", False),
    ("{client_ip: {in_list: nets}}", True),
    ("{helo: {equals: mail.example.org}}", True),
    ("{helo: {in: ['.example.org']}}", True),  # a leading dot covers subdomains
    ("{helo: {in: ['.mail.example.org']}}", False),  # ... but not the domain itself
    ("{size: {gt: 100}}", True),
    ("{size: {gt: 1M}}", False),
    ("{size: {lt: 1K}}", False),
    ("{size: {gt: 1K, lt: 1M}}", True),
    # headers
    ("{header: {name: X-Mailer, regex: '^TestMailer \\d'}}", True),
    ("{header: {name: x-mailer, contains: testmailer}}", True),
    ("{header: {name: X-Mailer, contains: testmailer, case: sensitive}}", False),
    ("{header: {name: X-Mailer, exists: true}}", True),
    ("{header: {name: X-Missing, exists: true}}", False),
    ("{header: {name: X-Missing, exists: false}}", True),
    ("{subject: {equals: Café meeting}}", True),  # RFC 2047 decoded
    ("{subject: {contains: '=?utf-8'}}", False),
    ("{subject: {equals: CAFÉ MEETING}}", True),  # Unicode case folding
    ("{header: {name: Subject, glob: 'caf? *'}}", True),
    ("{from: {name: {equals: Alice Example}}}", True),
    ("{from: {domain: {in: [example.org]}}}", True),
    ("{from: {address: {equals: alice@example.org}, name: {contains: alice}}}", True),
    ("{from: {address: {equals: alice@example.org}, name: {contains: bob}}}", False),
    ("{from: {equals: alice@example.org}}", True),  # the whole address
    ("{from: {name_domain_mismatch: true}}", False),
    ("{to: {domain: {equals: example.com}}}", True),  # second address of To
    ("{to: {name: {equals: bob}}}", True),
    ("{to: {address: {equals: carol@example.com}, name: {equals: bob}}}", False),  # same item
    # content
    ("{body: {contains: agenda is at}}", True),  # quoted-printable decoded
    ("{body: {contains: '\u2013 see you'}}", True),  # =E2=80=93 decoded to an en dash
    ("{body: {contains: 'Hello Bob,'}}", True),  # from the HTML part, rendered
    ("{body: {contains: '<b>'}}", False),  # markup is not text
    ("{body: {regex: '(?m)^hello bob'}}", True),
    ("{raw: {contains: '=E2=80=93'}}", True),
    ("{raw: {contains: '<b>Bob</b>'}}", True),
    ("{url: {domain: {equals: docs.example.com}}}", True),  # from the text part
    ("{url: {domain: {equals: tracker.example.net}}}", True),  # from an HTML href
    ("{url: {domain: {in_list: subdomains}}}", True),
    ("{url: {glob: 'https://docs.example.com/*'}}", True),
    ("{url: {text_domain_mismatch: true}}", True),
    ("{url: {link_text: {equals: www.example.com}}}", True),
    ("{url: {link_text: {equals: www.example.com}, domain: {equals: docs.example.com}}}", False),
    # attachments
    ("{attachment: {filename: {equals: Résumé.pdf}}}", True),  # RFC 2231 decoded
    ("{attachment: {content_type: {equals: application/pdf}}}", True),
    ("{attachment: {detected_type: {equals: application/pdf}}}", True),
    ("{attachment: {filename: {glob: '*.zip'}, detected_type: {equals: application/zip}}}", True),
    ("{attachment: {filename: {glob: '*.pdf'}, detected_type: {equals: application/zip}}}", False),
    ("{attachment: {archive: {filename: {glob: '*.exe'}}}}", True),
    ("{attachment: {archive: {filename: {glob: '*.exe'}, size: {gt: 50}}}}", True),
    ("{attachment: {archive: {filename: {glob: '*.exe'}, size: {gt: 1K}}}}", False),
    ("{attachment: {filename: {glob: '*.pdf'}, archive: {filename: {glob: '*.exe'}}}}", False),
    ("{attachment: {size: {gt: 10M}}}", False),
    ("{attachment: {size: {lt: 100}}}", True),
    # message structure (RAW is walked whole)
    ("{mime_truncated: true}", False),
    ("{not: {mime_truncated: parts}}", True),
    # combinators
    ("{all: [{subject: {contains: café}}, {not: {body: {contains: viagra}}}]}", True),
    ("{all: [{subject: {contains: café}}, {body: {contains: viagra}}]}", False),
    ("{any: [{body: {contains: viagra}}, {sender: {domain: {equals: example.org}}}]}", True),
    ("{any: [{body: {contains: viagra}}, {subject: {contains: casino}}]}", False),
    ("{not: {not: {subject: {contains: meeting}}}}", True),
    ("{subject: {contains: meeting}, sender: {equals: nobody@example.org}}", False),  # implicit all
    ("{all: []}", True),
]


@pytest.mark.parametrize(("condition", "expected"), CASES, ids=[c for c, _ in CASES])
def test_condition(tmp_path: Path, condition: str, expected: bool) -> None:
    assert _matches(tmp_path, condition) is expected


MATCHERS = [
    # (matcher, subject, expected)
    ("{equals: Hello World}", "hello world", True),
    ("{equals: Hello World, case: sensitive}", "hello world", False),
    ("{equals: Hello}", "Hello World", False),
    ("{equals: [Hi, Hello World]}", "Hello World", True),
    ("{contains: WORLD}", "Hello World", True),
    ("{contains: 'a.c'}", "abc", False),  # literal, not a regex
    ("{contains: [foo, orl]}", "Hello World", True),
    ("{regex: 'w.rld$'}", "Hello World", True),
    ("{regex: 'w.rld$', case: sensitive}", "Hello World", False),
    ("{regex: '^world'}", "Hello World", False),
    ("{regex: ['^x', 'lo\\sW']}", "Hello World", True),
    ("{glob: 'hello*'}", "Hello World", True),
    ("{glob: 'hello'}", "Hello World", False),  # a glob covers the whole value
    ("{glob: 'H?llo [vw]orld'}", "Hello World", True),
    ("{glob: '[!h]ello*'}", "Hello World", False),
    ("{in: [hello world, other]}", "Hello World", True),
    ("{in: [hello]}", "Hello World", False),
    ("{in: [Hello World], case: sensitive}", "hello world", False),
    ("{in_list: people}", "alice@example.org", True),
]


@pytest.mark.parametrize(
    ("matcher", "subject", "expected"), MATCHERS, ids=[f"{m}~{s}" for m, s, _ in MATCHERS]
)
def test_matcher(tmp_path: Path, matcher: str, subject: str, expected: bool) -> None:
    raw = f"Subject: {subject}\r\nFrom: a@example.org\r\n\r\nbody\r\n".encode()
    message = Message(Envelope("a@example.org", ("b@example.org",)), raw)
    assert _matches(tmp_path, f"{{subject: {matcher}}}", message) is expected


@pytest.mark.parametrize(
    ("sender", "condition", "expected"),
    [
        ("", "{sender: {equals: ''}}", True),  # the null sender <>
        ("", "{sender: {domain: {equals: ''}}}", True),
        ("user@example.org", "{sender: {equals: ''}}", False),
        ("", "{sender: {in_list: people}}", False),
    ],
)
def test_null_sender(tmp_path: Path, sender: str, condition: str, expected: bool) -> None:
    message = Message(Envelope(sender, ("b@example.org",)), b"Subject: x\r\n\r\nbody\r\n")
    assert _matches(tmp_path, condition, message) is expected


@pytest.mark.parametrize(
    ("client_ip", "expected"),
    [
        ("192.0.2.77", True),
        ("[192.0.2.77]", True),
        ("IPv6:2001:db8::1", True),
        ("::ffff:192.0.2.77", True),  # an IPv4 client as a socket on [::] sees it
        ("198.51.100.1", False),
        (None, False),
        ("not-an-ip", False),
    ],
)
def test_client_ip_forms(tmp_path: Path, client_ip: str | None, expected: bool) -> None:
    message = Message(
        Envelope("a@example.org", ("b@example.org",), client_ip=client_ip),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    condition = "{client_ip: {in: [192.0.2.0/24, '2001:db8::/32']}}"
    assert _matches(tmp_path, condition, message) is expected


def test_missing_helo_does_not_match_but_its_negation_does(tmp_path: Path) -> None:
    message = Message(Envelope("a@example.org", ("b@example.org",)), b"Subject: x\r\n\r\n")
    assert _matches(tmp_path, "{helo: {regex: '.*'}}", message) is False
    assert _matches(tmp_path, "{not: {helo: {regex: '.*'}}}", message) is True


@pytest.mark.parametrize(
    ("link_text", "href", "expected"),
    [
        ("https://www.paypal.com/signin", "http://paypa1-secure.example/login", True),
        ("www.bank.example", "https://evil.example/x", True),
        ("paypal.com", "https://www.paypal.com/x", False),  # same site
        ("www.example.com", "https://news.example.com/a", False),  # a subdomain of the shown one
        ("Click here", "https://evil.example/x", False),  # not a URL
        ("visit www.bank.example today", "https://evil.example/x", False),  # prose, not a URL
    ],
)
def test_link_text_mismatch(tmp_path: Path, link_text: str, href: str, expected: bool) -> None:
    raw = (
        f'Subject: x\r\nContent-Type: text/html\r\n\r\n<a href="{href}">{link_text}</a>\r\n'
    ).encode()
    message = Message(Envelope("a@example.org", ("b@example.org",)), raw)
    assert _matches(tmp_path, "{url: {text_domain_mismatch: true}}", message) is expected


@pytest.mark.parametrize(
    ("from_header", "expected"),
    [
        ('"service@paypal.com" <x@evil.example>', True),
        ('"www.bank.com security" <x@evil.example>', True),
        ('"Booking.com" <noreply@mail.booking.com>', False),
        ('"Alice Example" <alice@example.org>', False),
        ('"Mr.Smith" <smith@example.org>', False),
        ("<x@evil.example>", False),
    ],
)
def test_name_domain_mismatch(tmp_path: Path, from_header: str, expected: bool) -> None:
    raw = f"From: {from_header}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    message = Message(Envelope("a@example.org", ("b@example.org",)), raw)
    assert _matches(tmp_path, "{from: {name_domain_mismatch: true}}", message) is expected


def test_the_mismatch_checks_take_text_that_is_not_valid_unicode(tmp_path: Path) -> None:
    # A lone surrogate (what UTF-7's "+2AA-" decodes to) made RE2 raise: a 451 for the message
    # on every retry. The checks see U+FFFD in its place.
    from filterd.rules.conditions import shown_domain

    assert shown_domain("https://www.paypal.com/\ud800") == "www.paypal.com"
    name = "=?utf-7?q?+2AA-service@paypal.com?="
    raw = f"From: {name} <x@evil.example>\r\nSubject: x\r\n\r\nbody\r\n".encode()
    message = Message(Envelope("a@example.org", ("b@example.org",)), raw)
    assert _matches(tmp_path, "{from: {name_domain_mismatch: true}}", message) is True


def test_utf7_text_decodes_without_lone_surrogates() -> None:
    from filterd.mime_headers import decode_text

    assert decode_text(b"+2AA-www.paypal.com", "utf-7") == "\ufffdwww.paypal.com"


def test_the_scan_limit_applies_to_each_text_part(tmp_path: Path) -> None:
    # A long harmless first part must not push the next one out of the body rules' sight.
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - {name: fee, if: {body: {contains: western union}}, then: {score: 1}}\n"
    )
    ruleset = load_ruleset(tmp_path / "rules.yaml", max_scan_bytes=1000)
    filler = "harmless words " * 200  # 3,000 bytes: past the limit on its own
    raw = (
        'Subject: x\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        f"--b\r\nContent-Type: text/plain\r\n\r\n{filler}\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\npay the fee by western union\r\n--b--\r\n"
    ).encode()
    verdict = evaluate(ruleset, Message(Envelope("a@example.org", ("b@example.org",)), raw))
    assert verdict.rules == ("fee",)


def test_trace_detail_names_the_matched_text(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        textwrap.dedent("""\
        rules:
          - name: agenda
            if: {body: {regex: 'agenda is \\w+'}}
            then: {score: 1}
          - name: zipped-exe
            if: {attachment: {archive: {filename: {glob: '*.exe'}}}}
            then: {score: 1}
        """)
    )
    verdict = evaluate(load_ruleset(tmp_path / "rules.yaml"), Message(ENVELOPE, RAW))
    details = {entry.rule: entry.detail for entry in verdict.trace}
    assert '"agenda is at"' in details["agenda"]
    assert '"inner/tool.exe"' in details["zipped-exe"]


def _html_links(harmless: int) -> Message:
    """An HTML mail with ``harmless`` distinct ordinary links, then a deceptive one."""
    links = "".join(
        f'<a href="https://news.example.org/item/{i}">item {i}</a>\n' for i in range(harmless)
    )
    deceptive = '<a href="https://evil.example/login">https://www.paypal.com/signin</a>'
    raw = f"Subject: news\r\nContent-Type: text/html\r\n\r\n{links}{deceptive}\r\n"
    return Message(Envelope("a@example.org", ("b@example.org",)), raw.encode())


def test_url_rules_see_a_link_behind_a_thousand_harmless_ones(tmp_path: Path) -> None:
    message = _html_links(1500)
    assert _matches(tmp_path, "{url: {text_domain_mismatch: true}}", message) is True
    assert _matches(tmp_path, "{url: {domain: {in: [evil.example]}}}", message) is True


def test_url_rules_see_the_urls_the_parser_keeps_and_no_more(tmp_path: Path) -> None:
    """The limit docs/security.md states: the first MAX_URLS distinct URLs of a message."""
    from filterd.mime import MAX_URLS

    assert _matches(tmp_path, "{url: {domain: {in: [evil.example]}}}", _html_links(MAX_URLS - 1))
    assert not _matches(tmp_path, "{url: {domain: {in: [evil.example]}}}", _html_links(MAX_URLS))


def _zip_attachment(filename: str, members: list[str]) -> str:
    archive = _zip(dict.fromkeys(members, b""))
    return (
        "--b\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n{archive}\r\n'
    )


def test_the_archive_member_limit_applies_per_archive(tmp_path: Path) -> None:
    # A first zip of 1,000 photos must not hide a script in the second.
    from filterd.mime import MAX_ARCHIVE_MEMBERS

    photos = _zip_attachment("photos.zip", [f"img{i}.jpg" for i in range(MAX_ARCHIVE_MEMBERS)])
    script = _zip_attachment("invoice.zip", ["invoice.js"])
    head = 'Subject: x\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    raw = f"{head}{photos}{script}--b--\r\n"
    message = Message(Envelope("a@example.org", ("b@example.org",)), raw.encode())
    condition = (
        "{attachment: {filename: {equals: invoice.zip}, archive: {filename: {glob: '*.js'}}}}"
    )
    assert _matches(tmp_path, condition, message) is True
    assert _matches(tmp_path, "{attachment: {archive: {filename: {equals: img999.jpg}}}}", message)


def _many_parts(empty: int) -> Message:
    """``empty`` empty MIME parts, then an executable behind a double extension."""
    parts = "--b\r\n" * empty
    exe = (
        "--b\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="invoice.pdf.exe"\r\n\r\nMZ\r\n--b--\r\n'
    )
    raw = f'Subject: x\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n{parts}{exe}'
    return Message(Envelope("a@example.org", ("b@example.org",)), raw.encode())


DEEP = (Path(__file__).resolve().parents[1] / "corpus" / "malformed-deep-nesting.eml").read_bytes()


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("{mime_truncated: true}", {"parts": True, "depth": True, "whole": False}),
        ("{mime_truncated: parts}", {"parts": True, "depth": False, "whole": False}),
        ("{mime_truncated: depth}", {"parts": False, "depth": True, "whole": False}),
    ],
)
def test_mime_truncated_names_the_limit_that_cut_the_walk(
    tmp_path: Path, condition: str, expected: dict[str, bool]
) -> None:
    envelope = Envelope("a@example.org", ("b@example.org",))
    messages = {
        "parts": _many_parts(600),
        "depth": Message(envelope, DEEP),
        "whole": _many_parts(400),
    }
    found = {name: _matches(tmp_path, condition, message) for name, message in messages.items()}
    assert found == expected


def test_a_part_past_the_limit_is_unseen_but_the_cut_is_not(tmp_path: Path) -> None:
    # Why mime_truncated exists. The message itself is the walk's first part, so after 499
    # empty parts the executable is the 501st: no attachment rule sees it.
    message = _many_parts(499)
    assert not _matches(tmp_path, "{attachment: {filename: {glob: '*.exe'}}}", message)
    assert _matches(tmp_path, "{mime_truncated: parts}", message)
    assert _matches(tmp_path, "{attachment: {filename: {glob: '*.exe'}}}", _many_parts(498))
    assert not _matches(tmp_path, "{mime_truncated: true}", _many_parts(498))


def test_the_trace_says_which_limit_cut_the_walk(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - {name: cut, if: {mime_truncated: true}, then: {score: 1}}\n"
    )
    verdict = evaluate(load_ruleset(tmp_path / "rules.yaml"), _many_parts(600))
    assert verdict.trace[0].detail == "MIME structure cut short: more than 500 parts"


@pytest.mark.parametrize(
    ("condition", "latin1", "utf8"),
    [
        # What docs/rules.md says of raw regexes on text that is not UTF-8.
        ("{raw: {regex: 'caf. cr'}}", False, True),
        ("{raw: {regex: 'caf[^a] cr'}}", False, True),
        ("{raw: {contains: café}}", False, True),
        ("{raw: {regex: 'caf\\C{1,2} cr'}}", True, True),
        ("{body: {contains: café crème}}", True, True),
        ("{body: {regex: 'caf. cr'}}", True, True),
    ],
)
def test_raw_regexes_read_bytes_as_utf8(
    tmp_path: Path, condition: str, latin1: bool, utf8: bool
) -> None:
    envelope = Envelope("a@example.org", ("b@example.org",))
    head = "Subject: x\r\nContent-Type: text/plain; charset={}\r\n\r\n"
    messages = {
        "latin1": head.format("iso-8859-1").encode() + "un café crème\r\n".encode("latin-1"),
        "utf8": head.format("utf-8").encode() + "un café crème\r\n".encode(),
    }
    found = {
        name: _matches(tmp_path, condition, Message(envelope, raw))
        for name, raw in messages.items()
    }
    assert found == {"latin1": latin1, "utf8": utf8}


def test_a_from_rule_sees_an_address_hiding_behind_the_first_one(tmp_path: Path) -> None:
    # No comma between the two: the second mailbox must still reach the rules on From.
    raw = (
        b'From: "Bank" <notices@bank.example> "Bank Security" <alerts@evil.example>\r\n'
        b"To: bob@example.net\r\nSubject: account\r\n\r\nPlease confirm.\r\n"
    )
    message = Message(ENVELOPE, raw)
    assert _matches(tmp_path, "{from: {domain: {equals: evil.example}}}", message)
    assert _matches(
        tmp_path, "{from: {name: {contains: Security}, domain: {equals: evil.example}}}", message
    )
