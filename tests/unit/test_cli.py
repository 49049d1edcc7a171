"""The ``filterd`` command line: which config file it finds, what it hands the daemon, and the
exit codes of bad invocations."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
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


@pytest.fixture(autouse=True)
def no_host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read this host's /etc/filterd: a test that wants a default file points at one."""
    absent = tmp_path / "no-etc" / "filterd.yaml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(absent))


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


def test_without_any_config_file_serve_runs_on_the_built_in_defaults(served: list[Any]) -> None:
    assert main(["serve", "--workers", "1"]) == 0
    [(config, config_path, _)] = served
    assert config_path is None
    assert config.source == "<built-in defaults>"


def _far_needle(tmp_path: Path) -> Path:
    """A config whose max_scan_bytes stops the body rules before a word late in the body, and
    a rule file whose test case expects what the daemon does: the word is not seen."""
    body = "From: a@b.example\nSubject: x\n\n" + "0123456789" * 4 + " needle\n"
    (tmp_path / "m.eml").write_text(body)
    _write(
        tmp_path / "r.yaml",
        """\
        rules:
          - name: far-word
            if: {body: {contains: needle}}
            then: {action: reject}
        tests:
          - name: past the scan limit
            message: m.eml
            expect: {action: accept}
        """,
    )
    return _write(tmp_path / "c.yaml", "rules: r.yaml\nlimits: {max_scan_bytes: 10}\n")


def test_test_command_applies_the_configs_max_scan_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _far_needle(tmp_path)
    assert main(["test", "-c", str(config)]) == 0, capsys.readouterr().out
    assert "PASS past the scan limit" in capsys.readouterr().out


def test_scan_and_test_agree_on_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _far_needle(tmp_path)
    assert main(["scan", "-c", str(config), "--json", str(tmp_path / "m.eml")]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "accept"


def exe_after(filler: int) -> bytes:
    """A message whose .exe attachment comes after ``filler`` bytes of an image part."""
    line = b"A" * 76 + b"\n"
    return (
        b"From: a@x.example\nTo: b@y.example\nSubject: t\nMIME-Version: 1.0\n"
        b"Content-Type: multipart/mixed; boundary=BB\n\n"
        b"--BB\nContent-Type: text/plain\n\nhi\n"
        b"--BB\nContent-Type: image/png; name=a.png\nContent-Transfer-Encoding: base64\n\n"
        + line
        * (filler // len(line))
        + b"--BB\nContent-Type: application/octet-stream; name=invoice.pdf.exe\n"
        b"Content-Transfer-Encoding: base64\n"
        b"Content-Disposition: attachment; filename=invoice.pdf.exe\n\n"
        b"TVqQAAAA\n--BB--\n"
    )


EXE_RULES = """\
rules:
  - name: executable
    if: {attachment: {filename: {glob: "*.exe"}}}
    then: {action: reject}
  - name: big
    if: {size: {gt: 1M}}
    then: {score: 1}
"""


RAW_RULES = """\
rules:
  - name: needle
    if: {raw: {contains: NEEDLE}}
    then: {action: reject}
"""


def needle_after(filler: int) -> bytes:
    """A plain message with NEEDLE after ``filler`` bytes of text."""
    return b"From: a@x.example\nSubject: t\n\n" + (b"y" * 76 + b"\n") * (filler // 77) + b"NEEDLE\n"


def test_scan_judges_a_large_message_on_all_of_it_as_the_daemon_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Past limits.spool_threshold (1M by default) the daemon spools the message and its rules
    # still see every part, read back from the spool: so does scan.
    rules = _write(tmp_path / "r.yaml", EXE_RULES)
    (tmp_path / "big.eml").write_bytes(exe_after(1_200_000))
    (tmp_path / "small.eml").write_bytes(exe_after(1000))
    argv = ["scan", "--rules", str(rules), "--json", str(tmp_path / "big.eml")]
    assert main([*argv, str(tmp_path / "small.eml")]) == 0
    big, small = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert big["action"] == "reject"
    assert "executable" in big["rules"]
    assert "big" in big["rules"]  # size sees the whole message
    assert (small["action"], small["rules"]) == ("reject", ["executable"])


def test_scan_uses_the_configs_spool_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # raw: rules stop where the daemon's copy of a spooled message's first bytes stops.
    _write(tmp_path / "r.yaml", RAW_RULES)
    config = _write(tmp_path / "c.yaml", "rules: r.yaml\nlimits: {spool_threshold: 128K}\n")
    (tmp_path / "m.eml").write_bytes(needle_after(200_000))
    assert main(["scan", "-c", str(config), "--json", str(tmp_path / "m.eml")]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "accept"
    assert main(["scan", "--rules", str(tmp_path / "r.yaml"), str(tmp_path / "m.eml")]) == 0
    assert "REJECT" in capsys.readouterr().out  # under the default 1M it is all in memory


def test_test_cases_are_judged_on_what_the_daemon_sees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "far.eml").write_bytes(needle_after(200_000))
    (tmp_path / "exe.eml").write_bytes(exe_after(200_000))
    _write(
        tmp_path / "r.yaml",
        RAW_RULES
        + EXE_RULES.removeprefix("rules:\n")
        + "tests:\n"
        + "  - {name: raw stops early, message: far.eml, expect: {action: accept}}\n"
        + "  - {name: parts are all seen, message: exe.eml, expect: {action: reject}}\n",
    )
    config = _write(tmp_path / "c.yaml", "rules: r.yaml\nlimits: {spool_threshold: 128K}\n")
    assert main(["test", "-c", str(config)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--listen", "bogus"],
        ["serve", "--listen", "127.0.0.1:99999"],
        ["serve", "--relay", "bad"],
        ["serve", "--metrics-listen", "nowhere"],
        ["serve", "--workers", "0"],
        ["serve", "--workers", "many"],
        ["scan", "--client-ip", "10.0.0.300", "m.eml"],
        ["scan", "--client-ip", "mail.example", "m.eml"],
    ],
)
def test_a_bad_option_value_is_a_usage_error(
    argv: list[str], served: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: filterd ")
    assert f"argument {argv[1]}" in err
    assert served == []


def test_good_option_values_reach_the_daemon(served: list[Any]) -> None:
    argv = ["serve", "--listen", "[::1]:10024", "--relay", "127.0.0.1:25", "--workers", "1"]
    assert main([*argv, "--metrics-listen", "none"]) == 0
    [(config, _, overrides)] = served
    assert [str(address) for address in config.listen] == ["[::1]:10024"]
    assert str(config.relay) == "127.0.0.1:25"
    assert config.metrics_listen is None
    assert overrides["workers"] == 1


@pytest.mark.parametrize("address", ["10.0.0.3", "[10.0.0.3]", "::ffff:10.0.0.3", "IPv6:fd00::1"])
def test_scan_accepts_a_client_ip_as_the_daemon_reads_one(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = _write(
        tmp_path / "r.yaml",
        """\
        rules:
          - name: inside
            if: {client_ip: {in: [10.0.0.0/8, "fd00::/8"]}}
            then: {action: reject}
        """,
    )
    (tmp_path / "m.eml").write_text("Subject: x\n\nhi\n")
    argv = ["scan", "--rules", str(rules), "--client-ip", address, "--json"]
    assert main([*argv, str(tmp_path / "m.eml")]) == 0
    assert json.loads(capsys.readouterr().out)["rules"] == ["inside"]


def test_scan_into_a_closed_pipe_stops_without_a_traceback(tmp_path: Path) -> None:
    """`filterd scan *.eml | head`: once the reader is gone, scan stops quietly."""
    repo = Path(__file__).resolve().parents[2]
    corpus = sorted(str(path) for path in (repo / "tests" / "corpus").glob("*.eml"))
    scan = subprocess.Popen(
        [sys.executable, "-m", "filterd", "scan", "--rules", str(repo / "rules"), *corpus],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert scan.stdout is not None
    scan.stdout.close()  # the reader is gone before the first line is written
    _, errors = scan.communicate(timeout=60)
    assert b"Traceback" not in errors, errors.decode()
    assert scan.returncode == 1


def _serve_failing(
    config: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``filterd serve -c config`` in a child process that is expected to stop at start-up."""
    return subprocess.run(
        [sys.executable, "-m", "filterd", "serve", "-c", str(config), *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("taken", ["listen", "metrics"])
def test_a_port_taken_at_start_is_one_line_and_exit_78(
    tmp_path: Path, workers: int, taken: str
) -> None:
    """amavisd-new's default ports are filterd's: on a host that runs it, the first start
    must say which port is taken, not print a traceback, and not be restarted in a loop
    (systemd's RestartPreventExitStatus=78)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            free = spare.getsockname()[1]
        listen, metrics = (port, free) if taken == "listen" else (free, port)
        config = tmp_path / "filterd.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{listen}\nrelay: 127.0.0.1:9\nworkers: {workers}\n"
            f"metrics: {{listen: '127.0.0.1:{metrics}'}}\nstate_dir: {tmp_path / 'state'}\n"
        )
        done = _serve_failing(config)
    what = "listen on" if taken == "listen" else "serve metrics on"
    assert done.returncode == 78, done.stderr
    assert f"filterd: cannot {what} 127.0.0.1:{port}: " in done.stderr
    assert "Traceback" not in done.stderr


def test_a_state_dir_that_cannot_be_made_is_one_line_and_exit_78(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "filterd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'a-file' / 'state'}\nmetrics: {{listen: null}}\n")
    done = _serve_failing(config, "--workers", "1")
    assert done.returncode == 78, done.stderr
    assert "filterd: cannot create the spool folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_without_a_config_says_it_checked_the_shipped_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No -c, no /etc/filterd: the shipped rules are what gets checked, and the OK must say so.
    monkeypatch.setattr(config_module, "DEFAULT_RULES_DIR", str(tmp_path / "no-etc" / "rules"))
    assert main(["check"]) == 0
    shipped = Path(config_module.shipped_rules_dir())
    assert capsys.readouterr().out.startswith(f"OK: {shipped} (the rules shipped with filterd): ")


def test_check_names_the_rules_path_it_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = _rules(tmp_path / "rules", "only")
    assert main(["check", "--rules", str(rules)]) == 0
    assert capsys.readouterr().out == f"OK: {rules}: 1 rule in 1 file, 0 lists\n"


def test_an_address_not_there_yet_exits_1_so_systemd_tries_again(tmp_path: Path) -> None:
    """At boot a listen address may not be configured yet (DHCP, IPv6 duplicate address
    detection): a later start can succeed, so the exit must not be 78, which stops systemd's
    restarts."""
    config = tmp_path / "filterd.yaml"
    config.write_text(
        f"listen: 192.0.2.1:10024\nmetrics: {{listen: null}}\nstate_dir: {tmp_path / 'state'}\n"
    )
    done = _serve_failing(config, "--workers", "1")
    assert done.returncode == 1, done.stderr
    assert "filterd: cannot listen on 192.0.2.1:10024: " in done.stderr
    assert "Traceback" not in done.stderr


def test_a_metrics_folder_that_is_not_there_is_one_line_and_exit_78(tmp_path: Path) -> None:
    config = tmp_path / "filterd.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nmetrics: {listen: null}\nworkers: 2\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    done = _serve_failing(config, env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")})
    assert done.returncode == 78, done.stderr
    assert "filterd: cannot use the metrics folder" in done.stderr
    assert "Traceback" not in done.stderr
