"""The config file's values: what parses, and what is refused with a located error."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd import config as config_module
from filterd.app import relay_client
from filterd.config import default_config, load_config, parse_duration, shipped_rules_dir
from filterd.errors import ConfigError


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -5, "0s"])
def test_a_duration_must_be_positive_and_finite(value: object) -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_duration(value)


@pytest.mark.parametrize(("value", "seconds"), [(30, 30.0), ("90m", 5400.0), ("2w", 1209600.0)])
def test_durations_in_numbers_and_units(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_a_nan_timeout_in_the_file_is_a_located_error(tmp_path: Path) -> None:
    # YAML's .nan is a float: it passed "> 0"-style checks that compare with <=, and a NaN
    # retention made the daemon fail later, at its first purge.
    config = tmp_path / "filterd.yaml"
    config.write_text("limits:\n  session_timeout: .nan\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(config))
    [problem] = caught.value.problems
    assert str(problem).startswith(f"{config}:2:")
    assert "positive, finite" in str(problem)


@pytest.fixture
def etc_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where /etc/filterd/rules would be (not created): tests never look at the real one."""
    folder = tmp_path / "etc" / "rules"
    monkeypatch.setattr(config_module, "DEFAULT_RULES_DIR", str(folder))
    return folder


def test_without_rules_the_config_uses_etc_filterd_rules_when_it_exists(
    tmp_path: Path, etc_rules: Path
) -> None:
    etc_rules.mkdir(parents=True)
    config = tmp_path / "filterd.yaml"
    config.write_text("relay: 127.0.0.1:10025\n")
    assert load_config(str(config)).rules == str(etc_rules)
    assert default_config().rules == str(etc_rules)


def test_without_rules_and_without_etc_filterd_rules_the_shipped_rules_load(
    tmp_path: Path, etc_rules: Path
) -> None:
    config = tmp_path / "filterd.yaml"
    config.write_text("relay: 127.0.0.1:10025\n")
    assert load_config(str(config)).rules == shipped_rules_dir()
    assert default_config().rules == shipped_rules_dir()
    assert (Path(shipped_rules_dir()) / "00-baseline.yaml").is_file()


def test_rules_named_in_the_config_win_over_etc_filterd_rules(
    tmp_path: Path, etc_rules: Path
) -> None:
    etc_rules.mkdir(parents=True)
    config = tmp_path / "filterd.yaml"
    config.write_text("rules: mine\n")
    assert load_config(str(config)).rules == str(tmp_path / "mine")


def test_the_relay_idle_timeout_reaches_the_relay_client(tmp_path: Path) -> None:
    config_file = tmp_path / "filterd.yaml"
    config_file.write_text("limits: {relay_idle_timeout: 5s}\n")
    config = load_config(str(config_file))
    assert config.limits.relay_idle_timeout == 5.0
    assert relay_client(config).idle_timeout == 5.0
    assert relay_client(default_config()).idle_timeout == 2.0
