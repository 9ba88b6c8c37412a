"""The `iseg` command: the engine's subcommands plus the daemon's.

Daemon commands: run (supervisor), validate-config, capture / dispatch / worker / publish /
record / console / sinks (one role each, for split hosts), dispatch stats, sinks status|resend|test,
subscribe, review, users, calibrate, gen-keys.
Every expected failure (bad config, bad model folder, unreachable camera) is one line
on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from daemon.config import ConfigError, DaemonConfig, config_json_schema, load_config
from daemon.sources import SourceError
from engine import EngineError

MAX_STORED_ID = 2**63 - 1
"""SQLite's largest integer: no recording or alert id is larger, and a larger one would overflow the query."""


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def _config(args: argparse.Namespace) -> DaemonConfig:
    return load_config(args.config)


def _role(body: Callable[[DaemonConfig, argparse.Namespace, Any], int], owns_state: bool = True
          ) -> Callable[[argparse.Namespace], int]:
    """Wrap a role body: load config, take the state dir's lock (roles that bind sockets or write
    state), set up logging and SIGTERM/SIGHUP handling."""
    def run(args: argparse.Namespace) -> int:
        from daemon.role import StopFlag, setup_logging
        from daemon.state_lock import StateDirInUse, acquire

        config = _config(args)
        if owns_state:
            try:
                acquire(config.state_path)
            except StateDirInUse as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        setup_logging(config.log_level)
        return body(config, args, StopFlag().install())
    return run


def cmd_run(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.supervisor import Supervisor

    return Supervisor(config, stop, duration=args.duration).run()


def cmd_capture(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.capture import run_capture

    return run_capture(config, args.camera, stop)


def cmd_worker(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.role import EX_CONFIG
    from daemon.worker import run_worker

    if args.remote and config.sockets.remote is None:
        print(f"error: worker --remote: {config.path} has no sockets.remote (host, results_port and the CurveZMQ "
              "keys of the main host; see configs/line.example.yaml)", file=sys.stderr)
        return EX_CONFIG
    if args.remote and config.dispatch.enabled and config.dispatch.port is None:
        print(f"error: worker --remote: {config.path} has dispatch enabled but no dispatch.port (the TCP port of "
              "the capture hosts' dispatchers; see configs/line.example.yaml)", file=sys.stderr)
        return EX_CONFIG
    return run_worker(config, stop, name=args.name, remote=args.remote)


def cmd_publish(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.publisher import run_publisher

    if args.backup and config.publisher.backup_host is None:
        print(f"error: publish --backup: {config.path} has no publisher.backup_host (the backup's address, which "
              "workers send results to once it leads)", file=sys.stderr)
        return 1
    return run_publisher(config, stop, backup=args.backup)


def cmd_dispatch(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.dispatcher import run_dispatcher

    if not config.dispatch.enabled:
        print(f"error: dispatch: {config.path} sets dispatch.enabled: false (captures push straight to the "
              "workers then); enable it to run a dispatcher", file=sys.stderr)
        return 1
    return run_dispatcher(config, stop)


def cmd_dispatch_stats(args: argparse.Namespace) -> int:
    from daemon.dispatch_stats import print_stats

    return print_stats(_config(args), args.json)


def cmd_record(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.recorder import run_recorder

    return run_recorder(config, stop)


def cmd_console(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.console.app import run_console

    return run_console(config, stop)


def cmd_users(args: argparse.Namespace) -> int:
    import secrets

    from daemon.console.users import UsersError, UsersFile

    config = _config(args)
    users_path = Path(config.console.users_file).expanduser()
    users = UsersFile(users_path if users_path.is_absolute() else config.state_path / users_path)
    try:
        if args.action == "list":
            for user in users.listing():
                print(f"{user['name']:<24} {user['role']:<9} {user['tokens']} token(s)")
            return 0
        if not args.name:
            raise ConfigError(f"users {args.action}: give the user name")
        if args.action == "add":
            if args.random_password:
                password = secrets.token_urlsafe(12)
            elif args.password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
            else:
                password = getpass.getpass(f"password for {args.name}: ")
                if getpass.getpass("again: ") != password:
                    raise ConfigError("users add: the two passwords differ")
            users.add(args.name, args.role, password)
            print(f"user {args.name} ({args.role}) saved in {users.path}")
            if args.random_password:
                print(f"  password: {password}")
        elif args.action == "remove":
            users.remove(args.name)
            print(f"user {args.name} removed")
        else:
            print(users.new_token(args.name))
            print(f"bearer token for {args.name} (shown once; send it as 'Authorization: Bearer TOKEN')", file=sys.stderr)
        return 0
    except UsersError as err:
        raise ConfigError(str(err)) from None


def cmd_sinks_role(config: DaemonConfig, args: argparse.Namespace, stop: Any) -> int:
    from daemon.sinks.role import run_sinks

    return run_sinks(config, stop)


def cmd_sinks(args: argparse.Namespace) -> int:
    if args.action is None:
        return _role(cmd_sinks_role)(args)
    from daemon.sinks import commands

    config = _config(args)
    if args.action == "status":
        return commands.print_status(config, args.json)
    if not args.sink:
        raise ConfigError(f"sinks {args.action}: give --sink NAME")
    if args.action == "resend":
        if args.from_id is None:
            raise ConfigError("sinks resend: give --from ID (the first alert id to send again)")
        return commands.resend(config, args.sink, args.from_id)
    return commands.send_test(config, args.sink)


def cmd_subscribe(args: argparse.Namespace) -> int:
    from daemon.role import StopFlag
    from daemon.subscribe import run_subscribe

    if args.since is not None and not 0 <= args.since <= MAX_STORED_ID:
        raise ConfigError(f"subscribe: --since {args.since} must be an alert id in 0..{MAX_STORED_ID}")
    if args.count is not None and not 1 <= args.count <= MAX_STORED_ID:
        raise ConfigError(f"subscribe: --count {args.count} must be in 1..{MAX_STORED_ID}")
    return run_subscribe(_config(args), args.topic or [], args.since, args.count, args.duration, StopFlag().install())


def cmd_validate(args: argparse.Namespace) -> int:
    from daemon.model_setup import check_prompts

    if args.schema:
        print(json.dumps(config_json_schema(), indent=2))
        return 0
    path = args.file or args.config
    if not path:
        raise ConfigError("validate-config: give the config file")
    config = load_config(path)
    prompts = "prompts fit the tokenizer" if check_prompts(config) else "prompts not checked: no model there yet"
    print(f"{path}: OK ({len(config.cameras)} camera(s): {', '.join(c.id for c in config.cameras)}; "
          f"model {config.model_path}; state {config.state_path}; {prompts})")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from daemon.recorder import RecordingStore
    from daemon.review import VERDICTS, NotFound, ReviewError, ReviewLog, mark_verdict

    config = _config(args)
    if args.id is not None and not 1 <= args.id <= MAX_STORED_ID:
        raise ConfigError(f"review {args.action}: {args.id} is not a recording id (ids are 1..{MAX_STORED_ID})")
    if not 1 <= args.limit <= 1_000_000:
        raise ConfigError(f"review list: --limit {args.limit} must be in 1..1000000")
    store = RecordingStore(config.state_path)
    try:
        if args.action == "list":
            rows = store.list(args.limit, args.camera, args.status)
            for row in rows:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["capture_ts"]))
                scores = " ".join(f"{name}={row['presence'][name]:.3f}" for name in row["flagged"])
                print(f"{row['id']:>6}  {when}  {row['camera']:<12} seq {row['seq']:<7} {row['status']:<11} {scores}")
            if not rows:
                print("no recordings", file=sys.stderr)
            return 0
        if args.id is None:
            raise ConfigError(f"review {args.action}: give the recording ID")
        if args.action == "show":
            try:
                record = store.get(args.id)
            except (ValueError, OSError) as err:
                raise ConfigError(f"review show: recording {args.id}'s meta.json is unreadable "
                                  f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
            if record is None:
                raise ConfigError(f"review show: no recording {args.id}")
            print(json.dumps(record, indent=2))
            return 0
        if args.verdict is None:
            raise ConfigError(f"review mark: give the verdict: {' or '.join(VERDICTS)}")
        log = ReviewLog(config.state_path)
        try:
            change = mark_verdict(store, log, args.id, args.verdict, args.user, args.note)
        except (NotFound, ReviewError) as err:
            raise ConfigError(f"review mark: {err}") from None
        finally:
            log.close()
        print(f"recording {args.id} marked {args.verdict} (was {change['old']})")
        return 0
    finally:
        store.close()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from daemon.calibration import run_calibration
    from daemon.role import setup_logging

    config = _config(args)
    setup_logging("WARNING")
    if args.from_eval:
        from daemon.calibration import calibrate_from_eval

        if not 0.0 < args.fpr < 1.0:
            raise ConfigError(f"--fpr: {args.fpr:g} must be a false-alarm rate between 0 and 1, e.g. 0.01")
        calibrate_from_eval(config, args.camera, Path(args.from_eval), args.fpr, args.category)
        return 0
    run_calibration(config, args.camera, args.frames)
    return 0


def cmd_gen_keys(args: argparse.Namespace) -> int:
    from daemon.security import generate_keys

    for path in generate_keys(Path(args.dir)):
        print(path)
    print("give the server's .key to remote workers, keep .key_secret files private; "
          "put client .key files in sockets.remote.authorized_clients_dir")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full `iseg` parser."""
    parser = argparse.ArgumentParser(prog="iseg", description="Camera inspection with iSeg (training-free segmentation).")
    sub = parser.add_subparsers(dest="command", required=True)
    from engine import register_commands

    register_commands(sub)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", required=True, help="daemon YAML config")
        return command

    run = with_config("run", "run the daemon: every role, supervised (Ctrl-C or SIGTERM stops it)")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.set_defaults(func=_role(cmd_run))

    validate = sub.add_parser("validate-config", help="check a config (and, when the model is there, that every "
                              "camera's prompt fits its tokenizer); exit 0 when valid, 1 with a one-line error")
    validate.add_argument("file", nargs="?")
    validate.add_argument("--config", help="the config (same as the positional FILE)")
    validate.add_argument("--schema", action="store_true", help="print the config's JSON Schema and exit")
    validate.set_defaults(func=cmd_validate)

    capture = with_config("capture", "run one camera's capture role")
    capture.add_argument("--camera", required=True, help="camera id")
    # Capture keeps nothing on disk: a capture host runs one per camera beside its dispatcher, no lock.
    capture.set_defaults(func=_role(cmd_capture, owns_state=False))

    worker = with_config("worker", "run a detection worker (one per GPU)")
    worker.add_argument("--name", default="worker.0", help="name in logs and metrics")
    worker.add_argument("--remote", action="store_true",
                        help="connect over TCP with CurveZMQ to the host in sockets.remote (a worker on another host)")
    worker.set_defaults(func=_role(cmd_worker, owns_state=False))

    publish = with_config("publish", "run the publisher role")
    publish.add_argument("--backup", action="store_true",
                         help="be the backup of a publisher pair (on publisher.backup_host): follow the primary, "
                              "take over when the dispatchers stop hearing it")
    publish.set_defaults(func=_role(cmd_publish))

    dispatch = with_config("dispatch", "run this capture host's dispatcher (credit-based frame dispatch), "
                                       "or with `stats`: print its per-camera frame accounting")
    dispatch.add_argument("action", nargs="?", choices=("stats",), help="stats: captured, dropped, published, "
                          "resent, lost, in flight per camera, from the running dispatcher")
    dispatch.add_argument("--json", action="store_true", help="stats as JSON")
    dispatch.set_defaults(func=lambda args: cmd_dispatch_stats(args) if args.action == "stats"
                          else _role(cmd_dispatch, owns_state=False)(args))
    with_config("record", "run the recorder role").set_defaults(func=_role(cmd_record))

    # The console reads the running daemon's stores (and writes verdicts through SQLite): it runs beside it, no lock.
    with_config("console", "run the operator console (web app) on its own").set_defaults(
        func=_role(cmd_console, owns_state=False))

    users = with_config("users", "manage the console's users: add, list, remove, token")
    users.add_argument("action", choices=("add", "list", "remove", "token"))
    users.add_argument("name", nargs="?", help="user name (add, remove, token)")
    users.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer", help="for add")
    users.add_argument("--password-stdin", action="store_true", help="for add: read the password from stdin")
    users.add_argument("--random-password", action="store_true", help="for add: generate a password and print it")
    users.set_defaults(func=cmd_users)

    sinks = with_config("sinks", "deliver alerts to MQTT / webhooks / PLCs (the sinks role), or: status, resend, test")
    sinks.add_argument("action", nargs="?", choices=("status", "resend", "test"),
                       help="status: cursor, lag, errors, dead letters; resend: from --from ID; test: one marked alert")
    sinks.add_argument("--sink", help="sink name (resend, test)")
    sinks.add_argument("--from", dest="from_id", type=int, help="resend: first alert id to send again")
    sinks.add_argument("--json", action="store_true", help="status as JSON")
    sinks.set_defaults(func=cmd_sinks)

    subscribe = with_config("subscribe", "print published messages as JSON lines")
    subscribe.add_argument("--topic", action="append", help="topic prefix, e.g. alert. or overlay.line1 (repeatable)")
    subscribe.add_argument("--since", type=int, help="first replay stored alerts with id greater than this")
    subscribe.add_argument("--count", type=int, help="exit after this many messages")
    subscribe.add_argument("--duration", type=float, help="exit after this many seconds")
    subscribe.set_defaults(func=cmd_subscribe)

    review = with_config("review", "list, show and mark recorded frames")
    review.add_argument("action", choices=("list", "show", "mark"))
    review.add_argument("id", nargs="?", type=int, help="recording id (show, mark)")
    review.add_argument("verdict", nargs="?", choices=("confirmed", "false-alarm", "unsure"), help="for mark")
    review.add_argument("--note", default="", help="for mark: why (kept in the audit trail)")
    review.add_argument("--user", default=_login_name(), help="for mark: who decided (default: your login name)")
    review.add_argument("--limit", type=int, default=50)
    review.add_argument("--camera")
    review.add_argument("--status", choices=("unreviewed", "confirmed", "false-alarm", "unsure"))
    review.set_defaults(func=cmd_review)

    calibrate = with_config("calibrate", "learn per-class thresholds from known-good frames, or take them from "
                            "an `iseg eval --json` result at a target false-alarm rate")
    calibrate.add_argument("--camera", required=True)
    calibrate.add_argument("--frames", type=int, default=100)
    calibrate.add_argument("--from-eval", dest="from_eval", metavar="RESULT.json",
                           help="threshold from this `iseg eval --format mvtec|visa --json` result instead of frames")
    calibrate.add_argument("--fpr", type=float, default=0.01,
                           help="with --from-eval: the image-level false-alarm rate whose operating point to use "
                                "(0.01; the eval has 0.01 and 0.05)")
    calibrate.add_argument("--category", help="with --from-eval: the eval's category (needed when it has several)")
    calibrate.set_defaults(func=cmd_calibrate)

    import daemon.linestats.cli

    daemon.linestats.cli.register(sub)

    keys = sub.add_parser("gen-keys", help="write CurveZMQ server and client key pairs")
    keys.add_argument("dir")
    keys.set_defaults(func=cmd_gen_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `iseg` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, EngineError, SourceError, TimeoutError, OSError, sqlite3.Error, zmq.ZMQError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
