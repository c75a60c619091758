"""Command line: ``python -m dylora_kernels demo [options]`` (or the ``dylora-demo`` script), and
``python -m dylora_kernels info`` (what was built, the GPU seen, the backends that run on it)."""
from __future__ import annotations

import argparse
import sys

COMMANDS = ("demo", "info")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        from . import info

        return info.main()
    if not argv or argv[0] not in COMMANDS:
        argv.insert(0, "demo")  # the default command: the dylora-demo script passes options only
    parser = argparse.ArgumentParser(prog="python -m dylora_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo.add_arguments(commands.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    args = vars(parser.parse_args(argv))
    args.pop("command")
    demo.run(**args)


if __name__ == "__main__":
    main()
