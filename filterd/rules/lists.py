"""Named lists: plain text files of entries that rules reference with ``in_list``.

One entry per line; blank lines and ``#`` comments (a whole line, or after whitespace) are
ignored. Entries keep their line so a bad entry (a malformed CIDR used by ``client_ip``) is
reported at ``list-file:line:col`` like any other rule problem. Lists are read at load, with
the rules, so a reload picks up edited lists too.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from filterd.errors import Problem
from filterd.yamlsrc import Pos

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_LIST_BYTES = 64 << 20  # a list is meant to be edited by hand; refuse absurd files


@dataclass(frozen=True)
class ListEntry:
    value: str
    line: int
    col: int


@dataclass(frozen=True)
class NamedList:
    """A loaded list: its name, file, and entries as written (with their positions)."""

    name: str
    path: str
    declared_at: Pos
    entries: tuple[ListEntry, ...]

    def values(self, case_sensitive: bool) -> frozenset[str]:
        if case_sensitive:
            return frozenset(entry.value for entry in self.entries)
        return frozenset(entry.value.casefold() for entry in self.entries)

    def networks(self, problems: list[Problem]) -> tuple[IpNetwork, ...]:
        """The entries as IP networks; a bad entry is a problem at its own line."""
        out: list[IpNetwork] = []
        for entry in self.entries:
            network = parse_network(entry.value)
            if network is None:
                problems.append(
                    Problem(
                        self.path,
                        entry.line,
                        entry.col,
                        f"list '{self.name}': not an IP address or CIDR: '{entry.value}'",
                    )
                )
            else:
                out.append(network)
        return tuple(out)


def parse_client_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address as a peer name or XFORWARD gives it ([1.2.3.4], IPv6:..., a zone
    suffix, IPv4-mapped IPv6); None if it is none."""
    if not text:
        return None
    return _parse_client_ip(text)


@functools.lru_cache(maxsize=4096)  # the same clients come back; parsing costs more than a lookup
def _parse_client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]  # Postfix XFORWARD writes IPv6 clients as IPv6:2001:db8::1
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        # ::ffff:192.0.2.7, as a socket listening on [::] sees an IPv4 client: the client is
        # 192.0.2.7, for the connection ACL and for the rules' IPv4 lists alike.
        return address.ipv4_mapped
    return address


def parse_network(text: str) -> IpNetwork | None:
    """An address or CIDR (host bits may be set: 10.1.2.3/8 means 10.0.0.0/8); None if invalid."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def parse_list_text(text: str) -> tuple[ListEntry, ...]:
    entries: list[ListEntry] = []
    # Lines end at \n (and \r\n) only: str.splitlines() also breaks at form feeds, U+0085 and
    # U+2028, which would turn the rest of a comment into an entry and shift line numbers.
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        content = line
        for marker in (" #", "\t#"):
            cut = content.find(marker)
            if cut >= 0:
                content = content[:cut]
        stripped = content.strip()
        if not stripped or stripped.startswith("#"):
            continue
        entries.append(ListEntry(stripped, number, len(content) - len(content.lstrip()) + 1))
    return tuple(entries)


def load_list(name: str, path: str, declared_at: Pos) -> NamedList | Problem:
    """Read the list file at ``path``; a missing or unreadable file is a problem at the key."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LIST_BYTES + 1)
    except OSError as exc:
        return declared_at.problem(f"list '{name}': cannot read {path}: {exc.strerror or exc}")
    if len(data) > MAX_LIST_BYTES:
        return declared_at.problem(f"list '{name}': {path} is larger than {MAX_LIST_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return declared_at.problem(f"list '{name}': {path} is not UTF-8: {exc.reason}")
    return NamedList(name, path, declared_at, parse_list_text(text))
