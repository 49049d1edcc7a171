"""Fixtures shared by every test tier."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nexthop import NextHop

CORPUS = Path(__file__).resolve().parent / "corpus"


def corpus_manifest() -> list[dict[str, object]]:
    return list(json.loads((CORPUS / "MANIFEST.json").read_text()))


@pytest.fixture
def nexthop() -> Iterator[NextHop]:
    with NextHop() as hop:
        yield hop
