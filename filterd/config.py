"""The daemon's configuration: a typed, frozen model loaded from YAML with located errors.

Every key is known here; unknown keys, wrong types and bad values are refused with
``file:line:col`` (the config file is the single source of truth, flags only override it).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filterd.errors import ConfigError, Problem
from filterd.yamlsrc import Pos, YamlMap, load_yaml_file

DEFAULT_CONFIG_PATH = "/etc/filterd/filterd.yaml"
DEFAULT_RULES_DIR = "/etc/filterd/rules"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class HostPort:
    """A listen or connect address; IPv6 hosts are written in brackets: ``[::1]:10024``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> HostPort:
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text.strip())
        if not match:
            raise ValueError(f"expected HOST:PORT (IPv6 as [ADDR]:PORT), got {text!r}")
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        return cls(host, port)


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 10_485_760
    max_recipients: int = 1000
    max_connections: int = 100
    max_connections_per_client: int = 50
    session_timeout: float = 300.0
    relay_timeout: float = 60.0
    # An unused pooled next-hop connection is closed after this long, as Postfix closes its
    # cached ones (smtp_connection_cache_time_limit, 2s): idle, it would hold one of the next
    # hop's process slots (maxproc) that a new connection may be waiting for.
    relay_idle_timeout: float = 2.0
    drain_timeout: float = 30.0
    max_scan_bytes: int = 1_048_576
    spool_threshold: int = 1_048_576
    worker_stall_timeout: float = 60.0


@dataclass(frozen=True)
class QuarantineConfig:
    path: str
    retention_seconds: float = 30 * 86400.0


@dataclass(frozen=True)
class TlsConfig:
    """STARTTLS on ingress: off unless a certificate and key are given."""

    cert: str | None = None
    key: str | None = None
    require: bool = False  # refuse MAIL before STARTTLS


@dataclass(frozen=True)
class RelayTlsConfig:
    """TLS to the next hop: ``none`` (default: the re-injection port is on loopback),
    ``opportunistic`` (STARTTLS when offered) or ``required``; certificates verified unless
    ``verify: false``."""

    mode: str = "none"
    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class LogConfig:
    format: str | None = None  # None: json unless stderr is a TTY
    level: str = "info"


@dataclass(frozen=True)
class Config:
    listen: tuple[HostPort, ...]
    relay: HostPort
    rules: str
    quarantine: QuarantineConfig
    metrics_listen: HostPort | None
    limits: Limits
    networks: tuple[IPNetwork, ...]
    log: LogConfig
    state_dir: str
    hostname: str
    workers: int = 1
    relay_pool_size: int = 32
    tls: TlsConfig = TlsConfig()
    relay_tls: RelayTlsConfig = RelayTlsConfig()
    source: str = "<built-in defaults>"

    def with_overrides(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def default_state_dir() -> str:
    """systemd's StateDirectory when set; /var/lib/filterd as root; otherwise a per-user folder
    so the daemon runs without root."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/filterd"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "filterd")


def shipped_rules_dir() -> str:
    """The rules shipped with filterd: the checkout's ``rules/`` or the installed data copy."""
    checkout = Path(__file__).resolve().parent.parent / "rules"
    if checkout.is_dir():
        return str(checkout)
    return str(Path(sys.prefix) / "share" / "filterd" / "rules")


def default_rules() -> str:
    """The rules of a config that names none: /etc/filterd/rules when that directory exists
    (where an admin keeps them, beside /etc/filterd/filterd.yaml), else the shipped rules, so
    a clone or a fresh install runs with those."""
    # Looked up at call time, not bound at import, so tests can point it elsewhere.
    installed = Path(DEFAULT_RULES_DIR)
    return str(installed) if installed.is_dir() else shipped_rules_dir()


def default_config() -> Config:
    state_dir = default_state_dir()
    return Config(
        listen=(HostPort("127.0.0.1", 10024),),
        relay=HostPort("127.0.0.1", 10025),
        rules=default_rules(),
        quarantine=QuarantineConfig(path=str(Path(state_dir) / "quarantine")),
        metrics_listen=HostPort("127.0.0.1", 9125),
        limits=Limits(),
        networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        log=LogConfig(),
        state_dir=state_dir,
        hostname="localhost",
        workers=os.cpu_count() or 1,
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object) -> float:
    """Seconds from a number or ``30d`` / ``12h`` / ``90m`` / ``45s`` / ``2w``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30d, 12h, 90s")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 30d, 12h, 90s, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not seconds > 0 or math.isinf(seconds):  # "not >" also refuses NaN (.nan in YAML)
        raise ValueError("duration must be a positive, finite number of seconds")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or ``10M`` / ``512K`` / ``1G``."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 10485760 or 10M")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 10485760 or 10M, got {value!r}")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError("size must be positive")
    return size


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive whole number, got {value!r}")
    return value


class _Reader:
    """Walks one YAML mapping, collecting problems instead of stopping at the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def check_keys(self, mapping: YamlMap, allowed: set[str], where: str) -> None:
        for key in mapping:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else ""
                self.problems.append(
                    mapping.key_at(key).problem(f"unknown key '{key}' in {where}{extra}")
                )

    def mapping(self, value: object, pos: Pos, where: str) -> YamlMap | None:
        if isinstance(value, YamlMap):
            return value
        self.problems.append(pos.problem(f"{where} must be a mapping"))
        return None

    def convert(self, mapping: YamlMap, key: str, parse: Any, default: Any) -> Any:
        if key not in mapping:
            return default
        try:
            return parse(mapping[key])
        except (ValueError, TypeError) as exc:
            self.problems.append(mapping.at(key).problem(f"{key}: {exc}"))
            return default


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _hostport(value: object) -> HostPort:
    return HostPort.parse(_string(value))


def _hostport_list(value: object) -> tuple[HostPort, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("at least one address is needed")
    return tuple(_hostport(item) for item in items)


def _optional_hostport(value: object) -> HostPort | None:
    if value is None or value is False:
        return None
    return _hostport(value)


def _networks(value: object) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of CIDR networks")
    result = []
    for item in value:
        try:
            result.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError as exc:
            raise ValueError(f"bad network {item!r}: {exc}") from exc
    return tuple(result)


def _log_format(value: object) -> str:
    if value not in ("json", "console"):
        raise ValueError("expected 'json' or 'console'")
    return str(value)


def _log_level(value: object) -> str:
    levels = ("debug", "info", "warning", "error", "critical")
    if not isinstance(value, str) or value.lower() not in levels:
        raise ValueError(f"expected one of {', '.join(levels)}")
    return value.lower()


def _resolve(path: str, base: Path) -> str:
    return str(path if Path(path).is_absolute() else base / path)


_TOP_KEYS = {
    "listen",
    "relay",
    "rules",
    "quarantine",
    "metrics",
    "limits",
    "networks",
    "log",
    "state_dir",
    "hostname",
    "workers",
    "relay_pool_size",
    "tls",
    "relay_tls",
}


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _relay_tls_mode(value: object) -> str:
    if value not in ("none", "opportunistic", "required"):
        raise ValueError("expected 'none', 'opportunistic' or 'required'")
    return str(value)


_LIMIT_PARSERS: dict[str, Any] = {
    "max_message_size": parse_size,
    "max_recipients": _positive_int,
    "max_connections": _positive_int,
    "max_connections_per_client": _positive_int,
    "session_timeout": parse_duration,
    "relay_timeout": parse_duration,
    "relay_idle_timeout": parse_duration,
    "drain_timeout": parse_duration,
    "max_scan_bytes": parse_size,
    "spool_threshold": parse_size,
    "worker_stall_timeout": parse_duration,
}


def parse_config(data: object, source: str, base: Path) -> Config:
    """Validate a loaded YAML document into a ``Config``; raise ``ConfigError`` listing every
    problem."""
    problems: list[Problem] = []
    read = _Reader(problems)
    defaults = default_config()
    if not isinstance(data, YamlMap):
        raise ConfigError.single(source, 1, 1, "the config file must be a YAML mapping")
    read.check_keys(data, _TOP_KEYS, "config")

    state_dir = read.convert(
        data, "state_dir", lambda v: _resolve(_string(v), base), defaults.state_dir
    )
    limits_map = (
        read.mapping(data["limits"], data.at("limits"), "limits") if "limits" in data else None
    )
    limits = defaults.limits
    if limits_map is not None:
        read.check_keys(limits_map, set(_LIMIT_PARSERS), "limits")
        values = {
            key: read.convert(limits_map, key, parser, getattr(defaults.limits, key))
            for key, parser in _LIMIT_PARSERS.items()
        }
        limits = Limits(**values)

    quarantine = QuarantineConfig(path=str(Path(state_dir) / "quarantine"))
    if "quarantine" in data and (
        qmap := read.mapping(data["quarantine"], data.at("quarantine"), "quarantine")
    ):
        read.check_keys(qmap, {"path", "retention"}, "quarantine")
        quarantine = QuarantineConfig(
            path=read.convert(qmap, "path", lambda v: _resolve(_string(v), base), quarantine.path),
            retention_seconds=read.convert(
                qmap, "retention", parse_duration, quarantine.retention_seconds
            ),
        )

    metrics_listen = defaults.metrics_listen
    if "metrics" in data and (mmap := read.mapping(data["metrics"], data.at("metrics"), "metrics")):
        read.check_keys(mmap, {"listen"}, "metrics")
        metrics_listen = read.convert(mmap, "listen", _optional_hostport, metrics_listen)

    log = defaults.log
    if "log" in data and (lmap := read.mapping(data["log"], data.at("log"), "log")):
        read.check_keys(lmap, {"format", "level"}, "log")
        log = LogConfig(
            format=read.convert(lmap, "format", _log_format, None),
            level=read.convert(lmap, "level", _log_level, "info"),
        )

    tls = TlsConfig()
    if "tls" in data and (tmap := read.mapping(data["tls"], data.at("tls"), "tls")):
        read.check_keys(tmap, {"cert", "key", "require"}, "tls")
        tls = TlsConfig(
            cert=read.convert(tmap, "cert", lambda v: _resolve(_string(v), base), None),
            key=read.convert(tmap, "key", lambda v: _resolve(_string(v), base), None),
            require=read.convert(tmap, "require", _bool, False),
        )
        if bool(tls.cert) != bool(tls.key):
            problems.append(data.at("tls").problem("tls needs both cert and key"))
        if tls.require and not tls.cert:
            problems.append(data.at("tls").problem("tls.require needs a cert and key"))
    relay_tls = RelayTlsConfig()
    if "relay_tls" in data and (
        rmap := read.mapping(data["relay_tls"], data.at("relay_tls"), "relay_tls")
    ):
        read.check_keys(rmap, {"mode", "verify", "ca_file", "server_name"}, "relay_tls")
        relay_tls = RelayTlsConfig(
            mode=read.convert(rmap, "mode", _relay_tls_mode, "none"),
            verify=read.convert(rmap, "verify", _bool, True),
            ca_file=read.convert(rmap, "ca_file", lambda v: _resolve(_string(v), base), None),
            server_name=read.convert(rmap, "server_name", _string, None),
        )

    config = Config(
        tls=tls,
        relay_tls=relay_tls,
        listen=read.convert(data, "listen", _hostport_list, defaults.listen),
        relay=read.convert(data, "relay", _hostport, defaults.relay),
        rules=read.convert(data, "rules", lambda v: _resolve(_string(v), base), defaults.rules),
        quarantine=quarantine,
        metrics_listen=metrics_listen,
        limits=limits,
        networks=read.convert(data, "networks", _networks, defaults.networks),
        log=log,
        state_dir=state_dir,
        hostname=read.convert(data, "hostname", _string, defaults.hostname),
        workers=read.convert(data, "workers", _positive_int, defaults.workers),
        relay_pool_size=read.convert(
            data, "relay_pool_size", _positive_int, defaults.relay_pool_size
        ),
        source=source,
    )
    if problems:
        raise ConfigError(problems)
    return config


def find_config_file(path: str | None) -> str | None:
    """The config file to read: ``path`` when given, else /etc/filterd/filterd.yaml when it
    exists, else None (the built-in defaults). The daemon keeps this answer so that a reload
    reads the file it started from, however that file was found."""
    if path is not None:
        return path
    # Looked up at call time, not bound at import, so tests can point it elsewhere.
    return DEFAULT_CONFIG_PATH if Path(DEFAULT_CONFIG_PATH).exists() else None


def load_config(path: str | None) -> Config:
    """Load ``path``; with ``None`` use /etc/filterd/filterd.yaml when it exists, else defaults."""
    path = find_config_file(path)
    if path is None:
        return default_config()
    data = load_yaml_file(path)
    return parse_config(data, path, Path(path).resolve().parent)


__all__ = [
    "Config",
    "HostPort",
    "Limits",
    "LogConfig",
    "QuarantineConfig",
    "RelayTlsConfig",
    "TlsConfig",
    "default_config",
    "default_rules",
    "find_config_file",
    "load_config",
    "parse_duration",
    "parse_size",
]
