"""The `oxpeft` command. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import json
import os
import stat
import shutil
import signal
import sys
import warnings
from typing import Callable, Sequence

import oxpeft
from oxpeft import _native


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"oxpeft {oxpeft.__version__}")
    return 0


def _config_path(target: str) -> str:
    """An adapter directory or its adapter_config.json, as the path of the JSON file."""
    if not os.path.exists(target):
        raise FileNotFoundError(f"{target}: no such file or directory")
    if not os.path.isdir(target):
        return target
    path = os.path.join(target, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{target}: no adapter_config.json in this folder (not a PEFT adapter folder)")
    return path


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _ranges(report: dict) -> str:
    spans = [a if a == b else f"{a} to {b}" for a, b in report["loads_as_is_ranges"]]
    return ", ".join(spans) if spans else "none of the releases oxpeft knows"


_SHOWN_CHARS = 80


def _shown(value) -> str:
    """A config value for the human report: its JSON, or for a long one its start and its size (a 3-million-entry
    target_modules is one line, not 50 MB of output)."""
    if isinstance(value, (list, dict)) and len(value) > _SHOWN_CHARS:
        text = json.dumps(value[:4] if isinstance(value, list) else dict(list(value.items())[:4]))  # never all of it
    else:
        text = json.dumps(value)
        if len(text) <= _SHOWN_CHARS:
            return text
    if isinstance(value, list):
        head = json.dumps(value[:3])[:-1]
        return f"{head[:_SHOWN_CHARS]}, ...] ({len(value):,} entries)"
    if isinstance(value, dict):
        head = json.dumps(dict(list(value.items())[:3]))[:-1]
        return f"{head[:_SHOWN_CHARS]}, ...}} ({len(value):,} keys)"
    return f"{text[:_SHOWN_CHARS]}... ({len(text):,} characters)"


def _cmd_config_check(args: argparse.Namespace) -> int:
    path = _config_path(args.dir)
    try:
        report = json.loads(_native.config_inspect(_read_text(path)))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{path}: {report['peft_type']} adapter config")
    written_by = report["written_by"] or "not a complete config of any PEFT release (hand-written or another tool)"
    print(f"  written by:     {written_by}")
    print(f"  loads as is in: PEFT {_ranges(report)} (of the releases up to {report['newest_known_release']})")
    if report["min_peft_version"] is None:
        print("  migratable to:  no release oxpeft knows (it has unknown fields that change results)")
    else:
        print(f"  migratable to:  PEFT {report['min_peft_version']} or later (oxpeft config migrate DIR --to VERSION)")
    uses = [
        f"{u['field']}={_shown(u['value'])}" + (f" (PEFT >= {u['since']})" if u["since"] != "0.2.0" else "")
        for u in report["features"]
    ]
    print(f"  uses:           {', '.join(uses) if uses else 'only defaults'}")
    folder = os.path.dirname(os.path.abspath(path))
    if "0.3.0" in report["loads_as_is"] and not os.path.exists(os.path.join(folder, "adapter_model.bin")):
        print("  note: PEFT 0.3 reads only adapter_model.bin weights; 0.4 on also read adapter_model.safetensors")
    for unknown in report["unknown_fields"]:
        kind = "neutral, dropped on load" if unknown["neutral"] else "NOT neutral, refused on load"
        print(f"  unknown field:  {_shown(unknown['field'])}={_shown(unknown['value'])} ({kind})")
    for note in report["notes"]:
        print(f"  note: {note}")
    return 0


def _cmd_config_migrate(args: argparse.Namespace) -> int:
    from oxpeft._io import atomic_write_text, refuse_existing

    source = _config_path(args.dir)
    text = _read_text(source)
    try:
        _, notes = _native.config_upgrade(text, True)
        migrated = json.loads(_native.config_downgrade(text, args.to))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    body = json.dumps(migrated, indent=2, sort_keys=True)

    if args.output is None:
        backup = _free_name(source + ".bak")
        mode = stat.S_IMODE(os.stat(source).st_mode)
        atomic_write_text(backup, text)
        atomic_write_text(source, body)
        # Rewritten in place, the file keeps its mode (and so does the copy of the original), as an edit would.
        os.chmod(source, mode)
        os.chmod(backup, mode)
        print(f"rewrote {source} for PEFT {args.to} (the original is in {backup})")
        return 0

    out = args.output
    refuse_existing(out, args.force)
    if out.endswith(".json"):
        atomic_write_text(out, body)
        print(f"wrote {out} for PEFT {args.to}")
        return 0
    # A directory: the adapter's other files (weights, README) come along so that it loads as it is.
    os.makedirs(out, exist_ok=True)
    source_dir = os.path.dirname(os.path.abspath(source))
    if os.path.abspath(out) != source_dir:
        for name in sorted(os.listdir(source_dir)):
            src = os.path.join(source_dir, name)
            if name != "adapter_config.json" and os.path.isfile(src) and not name.startswith("."):
                _atomic_copy(src, os.path.join(out, name))
    target = os.path.join(out, "adapter_config.json")
    atomic_write_text(target, body)
    print(f"wrote {target} for PEFT {args.to}")
    return 0


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... : the first name that does not exist yet."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _atomic_copy(src: str, dst: str) -> None:
    from oxpeft._io import atomic_write_with

    atomic_write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def _cmd_demo(args: argparse.Namespace) -> int:
    from oxpeft.demo import print_report, run_demo

    result = run_demo(steps=args.steps, output_dir=args.output_dir, seed=args.seed, force=args.force)
    print_report(result)
    return 0 if result.ok else 1


def _cmd_merge(args: argparse.Namespace) -> int:
    from oxpeft.checkpoint import merge_checkpoint

    report = merge_checkpoint(
        args.base,
        args.adapters,
        args.output,
        args.weights,
        force=args.force,
        exact_unmerge=not args.no_exact_unmerge,
        progress=not args.quiet,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(report.summary())
    return 0


def _cmd_unmerge(args: argparse.Namespace) -> int:
    from oxpeft.checkpoint import unmerge_checkpoint

    report = unmerge_checkpoint(
        args.merged,
        args.adapters,
        args.output,
        args.weights,
        force=args.force,
        progress=not args.quiet,
        approximate=args.approximate,
    )
    print(report.summary())
    return 0


def _cmd_alias(args: argparse.Namespace) -> int:
    from oxpeft import alias

    if args.action == "install":
        result = alias.install(args.target)
        print(f"alias {result.describe()}")
        if args.target is not None:
            print(f"put {result.target} first on PYTHONPATH for `import peft` to answer with oxpeft")
    elif args.action == "remove":
        alias.remove(args.target)
        print(f"alias removed from {alias.status(args.target).target}")
    else:
        print(f"alias {alias.status(args.target).describe()}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oxpeft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"oxpeft {oxpeft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("config", help="check or migrate an adapter_config.json across PEFT releases")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = config_sub.add_parser("check", help="who wrote it, which PEFT releases load it, what it uses")
    q.add_argument("dir", help="adapter directory (or its adapter_config.json)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=_cmd_config_check)
    q = config_sub.add_parser("migrate", help="rewrite the config so that a given PEFT release loads it")
    q.add_argument("dir", help="adapter directory (or its adapter_config.json)")
    q.add_argument("--to", required=True, metavar="VERSION", help="the PEFT release to write for, e.g. 0.10.0")
    q.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="a .json file, or a directory that receives the config and a copy of the adapter's other files; "
        "without it the config is rewritten in place and the original kept as adapter_config.json.bak",
    )
    q.add_argument("--force", action="store_true", help="replace an existing OUT")
    q.set_defaults(func=_cmd_config_migrate)

    p = sub.add_parser("demo", help="fine-tune a tiny built-in Llama with LoRA, save, reload and merge it")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument(
        "--output-dir",
        default=None,
        help="where to save the adapter; must not exist unless --force (default: a temporary folder, removed at the end)",
    )
    p.add_argument("--force", action="store_true", help="write into an existing --output-dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("alias", help="make `import peft` answer with oxpeft (an opt-in `peft` distribution), or undo it")
    p.add_argument("action", choices=["install", "remove", "status"])
    p.add_argument(
        "--target",
        metavar="DIR",
        help="write into DIR instead of site-packages (put DIR first on PYTHONPATH); the real peft may stay installed",
    )
    p.set_defaults(func=_cmd_alias)

    p = sub.add_parser("merge", help="merge LoRA / IA3 / LoHa / LoKr adapters into a safetensors checkpoint folder")
    p.add_argument("base", help="base checkpoint folder (model.safetensors or sharded with an index)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folders, merged in order")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1.0)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-exact-unmerge", action="store_true", help="do not write the exact-unmerge sidecar")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write the result even where merging turns a finite weight into inf or NaN (refused otherwise)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("unmerge", help="remove merged LoRA / IA3 / LoHa / LoKr adapters from a checkpoint folder")
    p.add_argument("merged", help="merged checkpoint folder")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="the adapter folders that were merged, in order")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--weights", type=float, nargs="+", help="weights used at merge time (read from the sidecar if present)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--approximate",
        action="store_true",
        help="without an exact-unmerge sidecar, subtract the adapters anyway (elements may differ from the original "
        "base by rounding); refused otherwise",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_unmerge)
    return parser


# The library's messages name its keywords; the command names its flags.
_KEYWORD_FLAGS = {
    "force=True": "--force",
    "approximate=True": "--approximate",
    "allow_nonfinite=True": "--allow-nonfinite",
}


def _as_flags(message: str) -> str:
    for keyword, flag in _KEYWORD_FLAGS.items():
        message = message.replace(keyword, flag)
    return message


class Terminated(BaseException):
    """SIGTERM / SIGHUP arrived (what `kill`, `timeout`, systemd and docker send): unwinds like Ctrl-C, so that a
    merge, unmerge or quantisation removes what it created."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    where = f"oxpeft {args.command}"
    # The long runs check for signals several times a second (the native code hands them to Python), so these
    # stop a run within a second; its partial output is removed on the way out.
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    with warnings.catch_warnings():
        # A warning reads as a message of the command, not as a line of oxpeft's source.
        warnings.showwarning = lambda message, *_rest, **_kw: print(f"{where}: warning: {message}", file=sys.stderr)
        try:
            return func(args)
        except (ValueError, OSError) as exc:
            print(f"{where}: error: {_as_flags(str(exc))}", file=sys.stderr)
            return 1
        except (Terminated, KeyboardInterrupt) as exc:
            name = exc.args[0] if isinstance(exc, Terminated) else "SIGINT"
            print(f"{where}: stopped by {name}", file=sys.stderr)
            return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
