"""The JSON Schema (draft-07) of rule files, for editors via yaml-language-server.

It mirrors what ``schema.py`` accepts, key for key, so an editor completes and flags the
same things ``filterd check`` does. ``filterd check`` stays the authority: the schema cannot
express cross-file facts (unique rule names, known lists) or RE2 syntax.
"""

from __future__ import annotations

from typing import Any

from filterd.model import Action
from filterd.rules.condparse import CASE_VALUES, MATCHER_KEYS, MIME_LIMITS
from filterd.rules.schema import NAME_RE

_KINDS = [k for k in MATCHER_KEYS if k not in ("in", "in_list")]
_REF = "#/definitions/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _object(
    properties: dict[str, Any],
    description: str = "",
    *,
    required: list[str] | None = None,
    min_properties: int | None = None,
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if description:
        schema["description"] = description
    if required:
        schema["required"] = required
    if min_properties is not None:
        schema["minProperties"] = min_properties
    return schema


def _parts(parts: dict[str, Any], description: str) -> dict[str, Any]:
    return {"anyOf": [_ref("matcher"), _object(parts, description, min_properties=1)]}


def _definitions() -> dict[str, Any]:
    string_list = {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]
    }
    matcher_props: dict[str, Any] = {kind: _ref("stringOrList") for kind in _KINDS}
    matcher_props["in"] = _ref("stringOrList")
    matcher_props["in_list"] = {"type": "string", "description": "name of a list under lists:"}
    matcher_props["case"] = {"enum": list(CASE_VALUES), "default": "insensitive"}
    matcher = _object(
        matcher_props,
        "a string matcher: exactly one of "
        + ", ".join(MATCHER_KEYS)
        + "; case-insensitive unless case: sensitive",
    )
    matcher["oneOf"] = [{"required": [kind]} for kind in MATCHER_KEYS]
    size_pattern = r"^\s*\d+(\.\d+)?\s*[kKmMgG]?([iI]?[bB])?\s*$"
    size_value = {
        "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": size_pattern}]
    }
    size = _object(
        {"gt": _ref("sizeValue"), "lt": _ref("sizeValue")},
        "bytes, or with a K / M / G suffix (1K = 1024)",
        min_properties=1,
    )
    true_only = {"const": True}
    envelope_parts = {"address": _ref("matcher"), "domain": _ref("matcher")}
    header_parts = {
        **envelope_parts,
        "name": _ref("matcher"),
        "name_domain_mismatch": {
            **true_only,
            "description": "extension: the display name shows another domain",
        },
    }
    header_props: dict[str, Any] = {"name": {"type": "string"}, "exists": {"type": "boolean"}}
    header_props.update(matcher_props)
    archive = _object(
        {"filename": _ref("matcher"), "size": _ref("size")},
        "a zip member satisfying every key",
        min_properties=1,
    )
    attachment = _object(
        {
            "filename": _ref("matcher"),
            "content_type": _ref("matcher"),
            "detected_type": _ref("matcher"),
            "size": _ref("size"),
            "archive": archive,
        },
        "an attachment satisfying every key",
        min_properties=1,
    )
    condition = _object(
        {
            "all": {"type": "array", "items": _ref("condition"), "description": "every one holds"},
            "any": {
                "type": "array",
                "items": _ref("condition"),
                "minItems": 1,
                "description": "at least one holds",
            },
            "not": _ref("condition"),
            "sender": _parts(envelope_parts, "the envelope sender ('' for <>)"),
            "recipient": _parts(envelope_parts, "any envelope recipient"),
            "client_ip": {
                "oneOf": [
                    _object({"in": _ref("stringOrList")}, "CIDRs or addresses", required=["in"]),
                    _object(
                        {"in_list": {"type": "string"}}, "a list of CIDRs", required=["in_list"]
                    ),
                ]
            },
            "helo": _ref("matcher"),
            "size": _ref("size"),
            "header": _object(
                header_props, "{name: X, <matcher>} or {name: X, exists: true}", required=["name"]
            ),
            "from": _parts(header_parts, "an address of the From header"),
            "to": _parts(header_parts, "an address of the To header"),
            "subject": _ref("matcher"),
            "body": _ref("matcher"),
            "raw": _ref("matcher"),
            "url": _parts(
                {
                    "domain": _ref("matcher"),
                    "link_text": _ref("matcher"),
                    "text_domain_mismatch": {
                        **true_only,
                        "description": "extension: link text shows another domain",
                    },
                },
                "a URL of the text or HTML links",
            ),
            "attachment": attachment,
            "mime_truncated": {
                "enum": [True, *MIME_LIMITS],
                "description": "extension: a parser limit cut the MIME walk short (true: either"
                " limit; parts: too many parts; depth: nested too deep)",
            },
        },
        "several keys in one mapping must all hold",
        min_properties=1,
    )
    action_names = [action.value for action in Action]
    address_list = {
        "anyOf": [
            {"type": "string", "format": "email"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
        ]
    }
    then = _object(
        {
            "action": {"enum": action_names},
            "reply": {
                "type": "string",
                "pattern": r"^[45]\d\d [45]\.\d{1,3}\.\d{1,3} .+$",
                "description": "for reject (5xx 5.x.y text) or tempfail (4xx 4.x.y text)",
            },
            "reason": {"type": "string"},
            "score": {"type": "number"},
            "stop": {"type": "boolean"},
            "bcc": address_list,
            "redirect": address_list,
            "add_header": {"type": "object", "additionalProperties": {"type": "string"}},
            "remove_header": _ref("stringOrList"),
            "subject_prefix": {"type": "string"},
        },
        "what a matching rule does",
        min_properties=1,
    )
    rule = _object(
        {
            "name": {"type": "string", "pattern": NAME_RE.pattern},
            "description": {"type": "string"},
            "mode": {"enum": ["enforce", "shadow"], "default": "enforce"},
            "if": _ref("condition"),
            "then": _ref("then"),
        },
        "one rule",
        required=["name", "if", "then"],
    )
    expect = _object(
        {
            "action": {"enum": action_names},
            "rules": _ref("stringOrList"),
            "not_rules": _ref("stringOrList"),
            "score_at_least": {"type": "number"},
            "score_below": {"type": "number"},
            "tag": {"type": "boolean"},
        },
        "what the verdict must be",
        min_properties=1,
    )
    test = _object(
        {
            "name": {"type": "string"},
            "message": {"type": "string", "description": "an .eml file, relative to this file"},
            "raw": {"type": "string", "description": "the message itself"},
            "sender": {"type": "string"},
            "recipients": _ref("stringOrList"),
            "client_ip": {"type": "string"},
            "helo": {"type": "string"},
            "expect": expect,
        },
        "a test case run by filterd test",
        required=["expect"],
    )
    test["oneOf"] = [{"required": ["message"]}, {"required": ["raw"]}]
    return {
        "stringOrList": string_list,
        "sizeValue": size_value,
        "size": size,
        "matcher": matcher,
        "condition": condition,
        "then": then,
        "rule": rule,
        "test": test,
    }


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a rule file (``filterd schema`` prints it)."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "filterd rule file",
        "description": "Rules, lists, thresholds and tests of filterd (see docs/rules.md).",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "lists": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "name: file (one entry per line, relative to this file)",
            },
            "rules": {"type": "array", "items": _ref("rule")},
            "scores": _object(
                {
                    "tag": {"type": "number"},
                    "quarantine": {"type": "number"},
                    "reject": {"type": "number"},
                },
                "thresholds on the summed score",
            ),
            "tag": _object({"subject_prefix": {"type": "string"}}, "how tagging looks"),
            "tests": {"type": "array", "items": _ref("test")},
        },
        "definitions": _definitions(),
    }
