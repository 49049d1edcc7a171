"""What an attachment really is: magic-byte type detection and zip member listing.

Type names follow libmagic's MIME output (``file --mime-type``) so admins can reuse what they
know. Zip listing reads only the central directory with ``struct`` (no decompression, no
``zipfile``, which builds an object for every entry before we could stop it): at most
``limit`` members, and a bounded forward scan of local headers when the directory is missing,
as in a truncated archive that Windows' unzipper still opens.
"""

from __future__ import annotations

import struct

# (offset, magic, type); checked in order, the first match wins.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"MZ", "application/x-dosexec"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),
    (0, b"PK\x07\x08", "application/zip"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"Rar!\x1a\x07", "application/x-rar"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/msword"),
    (0, b"\x7fELF", "application/x-executable"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"MSCF", "application/vnd.ms-cab-compressed"),
    (0, b"L\x00\x00\x00\x01\x14\x02\x00", "application/x-ms-shortcut"),
    (0, b"{\\rtf", "text/rtf"),
    (0, b"%!PS", "application/postscript"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"\xca\xfe\xba\xbe", "application/x-java-applet"),
    (32769, b"CD001", "application/x-iso9660-image"),
)
_PDF_WINDOW = 1024  # readers accept a PDF header anywhere in the first KiB
_TEXT_SAMPLE = 8192
_MAIL_STARTS = (
    b"received:",
    b"return-path:",
    b"delivered-to:",
    b"from:",
    b"message-id:",
    b"mime-version:",
    b"date:",
    b"subject:",
    b"to:",
    b"x-mailer:",
    b"dkim-signature:",
)
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<script", b"<iframe")
# Bytes that do not occur in text (libmagic's notion: C0 controls other than BEL..CR and ESC).
_BINARY_BYTES = bytes([*range(0, 7), *range(14, 27), *range(28, 32), 127])

_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_CENTRAL = b"PK\x01\x02"
_CENTRAL_SIZE = 46
_LOCAL = b"PK\x03\x04"
_LOCAL_SIZE = 30
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_MAX_COMMENT = 65535


def detect_type(data: bytes) -> str:
    """The MIME type the content's leading bytes say it has."""
    if not data:
        return "application/x-empty"
    for offset, magic, mime in _MAGIC:
        if data.startswith(magic, offset):
            return mime
    head = data[:_TEXT_SAMPLE]
    if b"%PDF-" in data[:_PDF_WINDOW]:
        return "application/pdf"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "text/plain"  # UTF-16 with a byte-order mark
    if len(head.translate(None, _BINARY_BYTES)) != len(head):
        return "application/octet-stream"
    lead = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if lead.startswith(_HTML_STARTS) or (lead.startswith(b"<?xml") and b"<html" in lead):
        return "text/html"
    if lead.startswith(_MAIL_STARTS):
        return "message/rfc822"
    return "text/plain"


def list_zip_members(data: bytes, limit: int = 1000) -> list[tuple[str, int]]:
    """(name, declared uncompressed size) of up to ``limit`` members of a zip archive.

    Never decompresses and never raises; a damaged archive yields what could be read.
    """
    try:
        members = _central_directory(data, limit)
        if members is None:
            members = _local_headers(data, limit)
    except (struct.error, ValueError, IndexError):
        return []
    return members


def _decode_name(raw: bytes, flags: int) -> str:
    # Bit 11 says UTF-8; otherwise the spec's code page 437 (what Windows writes as "OEM").
    return raw.decode("utf-8", "replace") if flags & 0x800 else raw.decode("cp437", "replace")


def _central_directory(data: bytes, limit: int) -> list[tuple[str, int]] | None:
    window_start = max(0, len(data) - _EOCD_SIZE - _MAX_COMMENT)
    eocd = data.rfind(_EOCD, window_start)
    if eocd < 0 or eocd + _EOCD_SIZE > len(data):
        return None
    _, _, _, _, total, cd_size, cd_offset, _ = struct.unpack_from("<4s4H2LH", data, eocd)
    if 0xFFFFFFFF in (cd_size, cd_offset) or total == 0xFFFF:
        zip64 = _zip64_directory(data, eocd)
        if zip64 is not None:
            cd_size, cd_offset = zip64
    # Where the directory really is: data prepended to the archive (self-extractors) shifts the
    # declared offset, so trust the directory size counted back from the end record first.
    start = eocd - cd_size
    if not (0 <= start < len(data) and data.startswith(_CENTRAL, start)):
        start = cd_offset
    members: list[tuple[str, int]] = []
    pos = start
    while len(members) < limit and data.startswith(_CENTRAL, pos):
        fields = struct.unpack_from("<4s6H3L5H2L", data, pos)
        flags, size, name_len, extra_len, comment_len = (
            fields[3],
            fields[9],
            fields[10],
            fields[11],
            fields[12],
        )
        name_start = pos + _CENTRAL_SIZE
        raw_name = data[name_start : name_start + name_len]
        if size == 0xFFFFFFFF:
            extra_start = name_start + name_len
            size = _zip64_extra_size(data[extra_start : extra_start + extra_len])
        members.append((_decode_name(raw_name, flags), size))
        pos = name_start + name_len + extra_len + comment_len
    return members if members or total == 0 else None


def _zip64_directory(data: bytes, eocd: int) -> tuple[int, int] | None:
    locator = eocd - 20
    if locator < 0 or not data.startswith(_ZIP64_LOCATOR, locator):
        return None
    (record,) = struct.unpack_from("<Q", data, locator + 8)
    if not data.startswith(_ZIP64_EOCD, record):
        return None
    cd_size, cd_offset = struct.unpack_from("<2Q", data, record + 40)
    return cd_size, cd_offset


def _zip64_extra_size(extra: bytes) -> int:
    """The uncompressed size from a zip64 extended-information extra field (header 0x0001)."""
    pos = 0
    while pos + 4 <= len(extra):
        header_id, length = struct.unpack_from("<2H", extra, pos)
        if header_id == 1 and length >= 8:
            (size,) = struct.unpack_from("<Q", extra, pos + 4)
            return int(size)
        pos += 4 + length
    return 0


def _local_headers(data: bytes, limit: int) -> list[tuple[str, int]]:
    """Walk local file headers from the front: for archives whose directory is missing."""
    members: list[tuple[str, int]] = []
    pos = data.find(_LOCAL)
    while pos >= 0 and len(members) < limit and pos + _LOCAL_SIZE <= len(data):
        fields = struct.unpack_from("<4s5H3L2H", data, pos)
        flags, compressed, size, name_len, extra_len = (
            fields[2],
            fields[7],
            fields[8],
            fields[9],
            fields[10],
        )
        name_start = pos + _LOCAL_SIZE
        members.append((_decode_name(data[name_start : name_start + name_len], flags), size))
        following = name_start + name_len + extra_len
        if flags & 0x08 or compressed in (0, 0xFFFFFFFF):
            # Sizes are in a trailing data descriptor: find the next header instead.
            pos = data.find(_LOCAL, following)
        else:
            pos = following + compressed
            if not data.startswith(_LOCAL, pos):
                pos = data.find(_LOCAL, following)
    return members
