"""The rule language: load rule files into an immutable ``RuleSet`` and ``evaluate`` messages.

``load_ruleset`` (schema.py: files, rules, actions; condparse.py: conditions; testcases.py:
``tests:``) validates and compiles; ``evaluate`` (pipeline.py, over view.py's lazy message
fields and matchers.py's multi-pattern sets) is the pure, synchronous verdict function;
``json_schema`` (jsonschema.py) describes the file format for editors; commands.py holds the
``check`` / ``scan`` / ``test`` / ``schema`` commands.
"""

from __future__ import annotations

from filterd.rules.jsonschema import json_schema
from filterd.rules.pipeline import (
    DEFAULT_MAX_SCAN_BYTES,
    Rule,
    RuleSet,
    RuleTestCase,
    TestExpectation,
    Thresholds,
    evaluate,
)
from filterd.rules.schema import load_ruleset, rule_files

__all__ = [
    "DEFAULT_MAX_SCAN_BYTES",
    "Rule",
    "RuleSet",
    "RuleTestCase",
    "TestExpectation",
    "Thresholds",
    "evaluate",
    "json_schema",
    "load_ruleset",
    "rule_files",
]
