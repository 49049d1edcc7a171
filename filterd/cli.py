"""Command-line parsing for the ``filterd`` console script; each command calls into its owner.

Exit codes: 0 success, 1 a message or command failed, 2 usage error, 78 invalid config/rules.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from filterd import __version__
from filterd.config import Config, HostPort, find_config_file, load_config
from filterd.errors import ConfigError, StartupError

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78


# Option values are checked while parsing, so a bad one is a usage error (exit 2, with the
# command's usage line) before anything runs.
def _hostport_arg(text: str) -> HostPort:
    try:
        return HostPort.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _metrics_listen_arg(text: str) -> HostPort | None:
    return None if text == "none" else _hostport_arg(text)


def _workers_arg(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return workers


def _client_ip_arg(text: str) -> str:
    # The rules' own parser: an address they would not understand never matches a client_ip
    # rule, which would make the dry-run's verdict silently wrong. Imported here: the rules
    # package is heavy and most commands never need it.
    from filterd.rules.lists import parse_client_ip

    if parse_client_ip(text) is None:
        raise argparse.ArgumentTypeError(f"expected an IPv4 or IPv6 address, got {text!r}")
    return text


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default /etc/filterd/filterd.yaml if present, else built-in defaults)",
    )


def _rules_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rules",
        metavar="PATH",
        help="a rule file or a directory of *.yaml (overrides the config)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filterd", description="SMTP content filter with YAML rules"
    )
    parser.add_argument("--version", action="version", version=f"filterd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    _config_option(serve)
    serve.add_argument(
        "--listen",
        type=_hostport_arg,
        metavar="H:P",
        action="append",
        help="listen address (repeatable)",
    )
    serve.add_argument("--relay", type=_hostport_arg, metavar="H:P", help="next hop")
    _rules_option(serve)
    serve.add_argument(
        "--metrics-listen",
        type=_metrics_listen_arg,
        default=False,  # False: not given; None: given as 'none', no metrics listener
        metavar="H:P",
        help="metrics address ('none' to disable)",
    )
    serve.add_argument(
        "--workers",
        type=_workers_arg,
        metavar="N",
        help="serving processes (default: config, else CPUs)",
    )
    # Internal: a worker started by the supervisor serves these inherited listening sockets.
    serve.add_argument("--worker-fds", help=argparse.SUPPRESS)

    check = commands.add_parser("check", help="validate the config and every rule file")
    _config_option(check)
    _rules_option(check)

    scan = commands.add_parser(
        "scan",
        help="dry-run messages through the rules and print the verdict",
        description=(
            "Dry-run messages through the rules and print the verdict and a trace of every"
            " rule; nothing is changed. Each message is judged as the daemon judges it: with"
            " the config's limits, and a message larger than limits.spool_threshold (default"
            " 1M) as a spooled one: raw: rules on its first spool_threshold bytes (cut back"
            " to a line end, the whole header kept), every other rule on all of it."
        ),
    )
    _config_option(scan)
    _rules_option(scan)
    scan.add_argument("--from", dest="sender", default="", metavar="A", help="envelope sender")
    scan.add_argument(
        "--to",
        dest="recipients",
        action="append",
        default=[],
        metavar="A",
        help="envelope recipient",
    )
    scan.add_argument("--client-ip", type=_client_ip_arg, metavar="IP")
    scan.add_argument("--helo", metavar="NAME")
    scan.add_argument("--json", action="store_true", help="one JSON object per message")
    scan.add_argument("files", nargs="+", metavar="FILE.eml")

    test = commands.add_parser("test", help="run the tests: cases of the rule files")
    _config_option(test)
    _rules_option(test)

    schema = commands.add_parser("schema", help="print the JSON Schema of rule files")
    _config_option(schema)

    quarantine = commands.add_parser("quarantine", help="manage the quarantine")
    qcommands = quarantine.add_subparsers(dest="qcommand", required=True, metavar="ACTION")
    qlist = qcommands.add_parser("list", help="list entries")
    _config_option(qlist)
    qlist.add_argument("--json", action="store_true")
    for name, text in (("show", "show one entry"), ("delete", "delete one entry")):
        sub = qcommands.add_parser(name, help=text)
        _config_option(sub)
        sub.add_argument("id")
    release = qcommands.add_parser("release", help="re-inject an entry through the relay")
    _config_option(release)
    release.add_argument("id")
    release.add_argument(
        "--to", action="append", metavar="ADDR", help="deliver to this address only (repeatable)"
    )
    purge = qcommands.add_parser("purge", help="delete entries older than an age")
    _config_option(purge)
    purge.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")
    return parser


def _load(args: argparse.Namespace, config_path: str | None) -> Config:
    config = load_config(config_path)
    if getattr(args, "rules", None):
        config = config.with_overrides(rules=args.rules)
    return config


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = tuple(args.listen)
    if args.relay:
        overrides["relay"] = args.relay
    if args.metrics_listen is not False:
        overrides["metrics_listen"] = args.metrics_listen
    if args.rules:
        overrides["rules"] = args.rules
    if args.workers is not None:
        overrides["workers"] = args.workers
    return overrides


def _run(args: argparse.Namespace) -> int:
    if args.command == "schema":
        from filterd.rules.commands import schema

        return schema(sys.stdout)
    # Found once: the daemon reloads from this same file on SIGHUP, also when it was not named
    # with -c but found at its default place.
    config_path = find_config_file(args.config)
    config = _load(args, config_path)
    if args.command == "serve":
        return _serve(args, config, config_path)
    if args.command == "check":
        from filterd.rules.commands import check

        return check(config.rules, sys.stdout, sys.stderr)
    if args.command == "scan":
        from filterd.rules.commands import scan

        return scan(
            config.rules,
            args.files,
            sender=args.sender,
            recipients=args.recipients,
            client_ip=args.client_ip,
            helo=args.helo,
            as_json=args.json,
            out=sys.stdout,
            err=sys.stderr,
            max_scan_bytes=config.limits.max_scan_bytes,
            spool_threshold=config.limits.spool_threshold,
        )
    if args.command == "test":
        from filterd.rules.commands import run_tests

        return run_tests(
            config.rules,
            sys.stdout,
            sys.stderr,
            max_scan_bytes=config.limits.max_scan_bytes,
            spool_threshold=config.limits.spool_threshold,
        )
    return _quarantine(args, config)


def _serve(args: argparse.Namespace, config: Config, config_path: str | None) -> int:
    overrides = _serve_overrides(args)
    config = config.with_overrides(**overrides)
    if args.worker_fds:
        fds = [int(fd) for fd in args.worker_fds.split(",")]
        config = config.with_overrides(metrics_listen=None)
    elif config.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus-client reads this once, at import: it must be set before anything imports it.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="filterd-metrics-")
        os.environ["FILTERD_OWNS_METRICS_DIR"] = "1"
    from filterd.observe import configure_logging

    configure_logging(config.log.format, config.log.level)
    if args.worker_fds:
        from filterd.app import serve

        return serve(config, config_path, overrides, inherited_fds=fds)
    if config.workers > 1:
        from filterd.app import prepare_state
        from filterd.supervisor import run_supervisor

        prepare_state(config)
        return run_supervisor(config, config_path, args.raw_argv, overrides)
    from filterd.app import serve

    return serve(config, config_path, overrides)


def _quarantine(args: argparse.Namespace, config: Config) -> int:
    from filterd.actions import quarantine_commands as commands
    from filterd.actions.quarantine import QuarantineStore
    from filterd.observe import configure_logging

    configure_logging(config.log.format, config.log.level)
    store = QuarantineStore(config.quarantine.path)
    out = sys.stdout
    if args.qcommand == "list":
        return commands.list_entries(store, as_json=args.json, out=out)
    if args.qcommand == "show":
        return commands.show_entry(store, args.id, out)
    if args.qcommand == "delete":
        return commands.delete_entry(store, args.id, out)
    if args.qcommand == "purge":
        return commands.purge_entries(store, args.older_than, out)

    from filterd.app import relay_client

    async def send(sender: str, recipients: Sequence[str], raw: bytes) -> None:
        client = relay_client(config, pool_size=1)
        try:
            await client.send(sender, recipients, raw)
        finally:
            await client.close()

    return commands.release_entry(store, args.id, to=args.to, send=send, out=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.raw_argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return _run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except StartupError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        # 78 stops systemd's restarts (RestartPreventExitStatus): only when a retry cannot help.
        return EX_FAILURE if exc.transient else EX_CONFIG
    except KeyboardInterrupt:
        return EX_FAILURE
    except BrokenPipeError:
        # The reader went away (`filterd scan ... | head`): stop quietly, as other commands
        # do, with stdout pointed at /dev/null so the interpreter's final flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_FAILURE
