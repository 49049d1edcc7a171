"""Safe YAML loading that keeps where every key and item came from.

PyYAML's loaders silently keep the last of duplicate keys and drop node positions; config and
rule files need both (errors are reported as ``file:line:col``). This module composes the node
tree with the safe loader and converts it into ``YamlMap`` / ``YamlSeq`` containers that remember
the 1-based position of each key, value and item. Scalars are resolved by the safe constructor,
so no tag can build arbitrary objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from filterd.errors import ConfigError, Problem


@dataclass(frozen=True)
class Pos:
    """A 1-based position in a source file."""

    source: str
    line: int
    col: int

    def problem(self, message: str) -> Problem:
        return Problem(self.source, self.line, self.col, message)


class YamlMap(dict[str, Any]):
    """A mapping that knows where it, each key and each value stand in the file."""

    pos: Pos
    key_pos: dict[str, Pos]
    value_pos: dict[str, Pos]

    def at(self, key: str) -> Pos:
        """Position of ``key``'s value (falls back to the map itself)."""
        return self.value_pos.get(key, self.pos)

    def key_at(self, key: str) -> Pos:
        return self.key_pos.get(key, self.pos)


class YamlSeq(list[Any]):
    """A sequence that knows where it and each of its items stand in the file."""

    pos: Pos
    item_pos: list[Pos]

    def at(self, index: int) -> Pos:
        return self.item_pos[index] if index < len(self.item_pos) else self.pos


# libyaml's composer when PyYAML was built with it: about ten times faster on large rule sets
# (the node tree and marks are the same).
_COMPOSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _pos(source: str, node: yaml.Node) -> Pos:
    return Pos(source, node.start_mark.line + 1, node.start_mark.column + 1)


# Values a document may hold once its aliases are expanded. Aliases are expanded (each use is a
# copy that knows its own position), so ten lines of anchors nesting ten aliases each would
# otherwise expand to billions of values: a loader that never returns, or a daemon killed for
# memory while it reloads. A thousand-rule file holds about ten thousand.
MAX_VALUES = 200_000


class _Converter:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.constructor = yaml.SafeLoader("")
        self.values = 0
        self.open: set[int] = set()  # the collections being converted: an alias back to one loops

    def convert(self, node: yaml.Node) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            mark = node.start_mark
            raise ConfigError.single(
                self.source,
                mark.line + 1,
                mark.column + 1,
                f"more than {MAX_VALUES:,} values once aliases are expanded (an alias bomb?)",
            )
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if id(node) in self.open:
                self.problems.append(
                    _pos(self.source, node).problem("an alias that refers to itself (recursive)")
                )
                return None
            self.open.add(id(node))
            try:
                if isinstance(node, yaml.MappingNode):
                    return self._mapping(node)
                seq = YamlSeq(self.convert(item) for item in node.value)
                seq.pos = _pos(self.source, node)
                seq.item_pos = [_pos(self.source, item) for item in node.value]
                return seq
            finally:
                self.open.discard(id(node))
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise  # located by load_yaml
        except (ValueError, OverflowError, TypeError) as exc:
            # YAML that parses but whose value cannot be built (2024-02-30, !!int abc, an
            # integer of thousands of digits): a located error, not a traceback.
            self.problems.append(_pos(self.source, node).problem(f"invalid value: {exc}"))
            return None

    def _mapping(self, node: yaml.MappingNode) -> YamlMap:
        result = YamlMap()
        result.pos = _pos(self.source, node)
        result.key_pos = {}
        result.value_pos = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problems.append(
                    _pos(self.source, key_node).problem("merge keys (<<) are not supported")
                )
                continue
            key = self._scalar(key_node)
            if not isinstance(key, str):
                key = str(key)
            key_pos = _pos(self.source, key_node)
            if key in result:
                first = result.key_pos[key]
                self.problems.append(
                    key_pos.problem(f"duplicate key '{key}' (first defined at line {first.line})")
                )
                continue
            result[key] = self.convert(value_node)
            result.key_pos[key] = key_pos
            result.value_pos[key] = _pos(self.source, value_node)
        return result


def load_yaml(text: str, source: str) -> Any:
    """Parse ``text`` (named ``source`` in errors); raise ``ConfigError`` on any problem.

    An empty document loads as an empty ``YamlMap``.
    """
    try:
        node = yaml.compose(text, Loader=_COMPOSER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError.single(source, line, col, f"invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError.single(source, 1, 1, f"invalid YAML: {exc}") from exc
    if node is None:
        empty = YamlMap()
        empty.pos, empty.key_pos, empty.value_pos = Pos(source, 1, 1), {}, {}
        return empty
    converter = _Converter(source)
    try:
        value = converter.convert(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError.single(source, line, col, f"invalid YAML: {exc}") from exc
    if converter.problems:
        raise ConfigError(converter.problems)
    return value


def load_yaml_file(path: str) -> Any:
    """Read and parse a YAML file; unreadable files are a ``ConfigError`` at 1:1."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single(path, 1, 1, f"cannot read file: {exc}") from exc
    return load_yaml(text, path)
