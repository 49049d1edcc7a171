"""The ``filterd`` command line: which config file it finds, what it hands the daemon, and the
exit codes of bad invocations."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

import filterd.app
import filterd.observe
from filterd import config as config_module
from filterd.app import Daemon
from filterd.cli import main
from filterd.config import Config


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _rules(folder: Path, *names: str) -> Path:
    folder.mkdir()
    rules = "".join(
        f"  - {{name: {name}, if: {{subject: {{contains: {name}}}}}, then: {{score: 1}}}}\n"
        for name in names
    )
    _write(folder / "r.yaml", "rules:\n" + rules)
    return folder


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Config, str | None, dict[str, Any]]]:
    """What ``filterd serve`` hands the daemon, instead of running it."""
    calls: list[tuple[Config, str | None, dict[str, Any]]] = []

    def fake_serve(config: Config, config_path: str | None, overrides: dict[str, Any]) -> int:
        calls.append((config, config_path, overrides))
        return 0

    monkeypatch.setattr(filterd.app, "serve", fake_serve)
    monkeypatch.setattr(filterd.observe, "configure_logging", lambda *args: None)
    return calls


def test_a_reload_rereads_the_default_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: list[Any]
) -> None:
    # Started without -c, from the config file at its default place: a SIGHUP must read that
    # file again, not reuse the config loaded at start.
    _rules(tmp_path / "rules-a", "rule-a")
    _rules(tmp_path / "rules-b", "rule-b")
    config_file = tmp_path / "filterd.yaml"
    body = f"workers: 1\nmetrics: {{listen: null}}\nstate_dir: {tmp_path / 'state'}\n"
    config_file.write_text(body + "rules: rules-a\n")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(config_file))

    assert main(["serve"]) == 0
    [(config, config_path, overrides)] = served
    assert config_path == str(config_file)

    async def reload_after_edit() -> tuple[str, ...]:
        daemon = Daemon(config, config_path, overrides)
        try:
            assert daemon.ruleset.rule_names == ("rule-a",)
            config_file.write_text(body + "rules: rules-b\n")
            await daemon.reload()
            return tuple(daemon.ruleset.rule_names)
        finally:
            await daemon.relay.close()

    assert asyncio.run(reload_after_edit()) == ("rule-b",)


def test_without_any_config_file_serve_runs_on_the_built_in_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: list[Any]
) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    assert main(["serve", "--workers", "1"]) == 0
    [(config, config_path, _)] = served
    assert config_path is None
    assert config.source == "<built-in defaults>"
