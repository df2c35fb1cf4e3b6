"""The `oxpeft` command. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import oxpeft


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"oxpeft {oxpeft.__version__}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from oxpeft.demo import print_report, run_demo

    result = run_demo(steps=args.steps, output_dir=args.output_dir, seed=args.seed)
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
    )
    print(report.summary())
    return 0


def _cmd_unmerge(args: argparse.Namespace) -> int:
    from oxpeft.checkpoint import unmerge_checkpoint

    report = unmerge_checkpoint(
        args.merged, args.adapters, args.output, args.weights, force=args.force, progress=not args.quiet
    )
    print(report.summary())
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oxpeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("demo", help="fine-tune a tiny built-in Llama with LoRA, save, reload and merge it")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--output-dir", default=None, help="where to save the adapter (default: a new temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("merge", help="merge LoRA adapters into a safetensors checkpoint folder")
    p.add_argument("base", help="base checkpoint folder (model.safetensors or sharded with an index)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folders, merged in order")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1.0)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-exact-unmerge", action="store_true", help="do not write the exact-unmerge sidecar")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("unmerge", help="remove merged LoRA adapters from a checkpoint folder")
    p.add_argument("merged", help="merged checkpoint folder")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="the adapter folders that were merged, in order")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--weights", type=float, nargs="+", help="weights used at merge time (read from the sidecar if present)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_unmerge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, OSError) as exc:
        print(f"oxpeft {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
