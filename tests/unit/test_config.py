"""The config file's values: what parses, and what is refused with a located error."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd.config import load_config, parse_duration
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
