"""`iseg stats` and `iseg thresholds whatif|set|show|revert`."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any, Callable

from daemon.config import load_config
from daemon.linestats import api
from daemon.linestats.report import to_csv, to_table


def _user() -> str:
    try:
        return f"{getpass.getuser()}@cli"
    except (KeyError, OSError):
        return "unknown@cli"


def _guard(body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except api.RequestError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return run


def cmd_stats(args: argparse.Namespace) -> int:
    result = api.stats(load_config(args.config), args.camera, args.since, args.by)
    print(to_csv(result["rows"]) if args.csv else to_table(result["rows"]), end="\n" if not args.csv else "")
    return 0


def cmd_whatif(args: argparse.Namespace) -> int:
    result = api.whatif(load_config(args.config), args.camera, args.cls, args.range, args.since)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    current = result["current"]
    print(f"{result['camera']}/{result['class']}: now {current['value']:.3f} ({current['source']}); "
          f"{result['frames']} frames in {result['minutes']} minute(s); {result['actual_alerts']} alert(s) raised")
    print(f"alerts: {result['method']['alerts']}")
    print(f"{'threshold':>9} {'flagged':>8} {'rate':>7} {'alerts':>6} {'missed':>6} {'fa_avoided':>10}  per shift")
    for row in result["rows"]:
        rate = "-" if row["flagged_rate"] is None else f"{row['flagged_rate']:.2%}"
        shifts = " ".join(f"{k}={v}" for k, v in row["per_shift"].items())
        print(f"{row['threshold']:>9.3f} {row['frames_flagged']:>8} {rate:>7} {row['alerts']:>6} "
              f"{row['confirmed_missed']:>6} {row['false_alarms_avoided']:>10}  {shifts}")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    entry = api.set_threshold(load_config(args.config), args.camera, args.cls,
                              {"value": args.value, "reason": args.reason or ""}, _user())
    print(_describe(entry))
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    entry = api.revert_threshold(load_config(args.config), args.camera, args.cls, _user(), args.reason or "")
    print(_describe(entry))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    result = api.thresholds(load_config(args.config))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{'camera':<12} {'class':<14} {'value':>6}  {'source':<11} {'default':>7} ({'from':<11})  override")
    for row in result["thresholds"]:
        override = row["override"]
        note = "" if override is None else (f"by {override['user']} at {_when(override['ts'])}"
                                            + (f": {override['reason']}" if override.get("reason") else ""))
        print(f"{row['camera']:<12} {row['class']:<14} {row['value']:>6.3f}  {row['source']:<11} "
              f"{row['default']:>7.3f} ({row['default_source']:<11})  {note}")
    return 0


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _describe(entry: dict[str, Any]) -> str:
    return (f"{entry['camera']}/{entry['class']}: {entry['old']:.3f} ({entry['old_source']}) -> "
            f"{entry['new']:.3f} ({entry['new_source']}) by {entry['user']} at {_when(entry['ts'])}"
            + (f": {entry['reason']}" if entry["reason"] else "") + "; running workers apply it within 2 s")


def register(sub: Any) -> None:
    """Add `stats` and `thresholds` to the `iseg` parser."""
    stats = sub.add_parser("stats", help="frames, flagged, alerts and verdicts per camera/class and hour or shift, "
                                         "with p-chart limits")
    stats.add_argument("--config", required=True, help="daemon YAML config")
    stats.add_argument("--camera", help="one camera (default: all)")
    stats.add_argument("--since", default="24h", help="window: 24h, 7d, 90m ... (default 24h)")
    stats.add_argument("--by", choices=("hour", "shift"), default="hour")
    stats.add_argument("--csv", action="store_true", help="CSV instead of a table")
    stats.set_defaults(func=_guard(cmd_stats))

    thresholds = sub.add_parser("thresholds", help="what-if, show, set and revert live presence thresholds")
    actions = thresholds.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str, target: bool) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("--config", required=True, help="daemon YAML config")
        if target:
            parser.add_argument("--camera", required=True)
            parser.add_argument("--cls", required=True, help="defect class")
        return parser

    whatif = action("whatif", "what each candidate threshold would have flagged and alerted", True)
    whatif.add_argument("--range", default="0.1:0.9:0.01", help="start:stop:step (default 0.1:0.9:0.01)")
    whatif.add_argument("--since", default="7d", help="history to replay: 7d, 24h, 30d ... (default 7d)")
    whatif.add_argument("--json", action="store_true")
    whatif.set_defaults(func=_guard(cmd_whatif))
    setter = action("set", "override a threshold now (running workers apply it within 2 s)", True)
    setter.add_argument("--value", required=True, help="threshold in [0, 1]")
    setter.add_argument("--reason", help="why (kept in the audit)")
    setter.set_defaults(func=_guard(cmd_set))
    show = action("show", "thresholds in force, where each comes from, and overrides", False)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_guard(cmd_show))
    revert = action("revert", "undo the latest change of a threshold", True)
    revert.add_argument("--reason", help="why (kept in the audit)")
    revert.set_defaults(func=_guard(cmd_revert))
