"""`moemesh` entry point: parse, set up logging, run the subcommand, turn our errors into one line.

Ctrl-C at any point ends it with exit code 130 and no traceback: while it imports, parses or
runs a command (`serve` and `daemon` turn SIGINT into their graceful stop, and say 130 after).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a command's own handling, e.g. while torch is imported
        return 130


def _main(argv: Sequence[str] | None) -> int:
    # Imported here, inside main's KeyboardInterrupt handling, not at module level: a Ctrl-C
    # while they load (~20 ms) would otherwise be a traceback before main() is even entered.
    import logging

    from node.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    from node.cli.commands import COMMANDS, held_signals
    from node.errors import MoemeshError
    from node.progress import configure

    loudness = min(max(args.verbose - args.quiet, -2), 2)
    level = {-2: logging.CRITICAL, -1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[loudness]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if loudness < 0:
        configure(False)  # -q: no progress bars either
    if args.command in ("daemon", "status") or getattr(args, "bootstrap", None):
        with held_signals():
            import libp2p  # noqa: F401  (importing it resets its logger, so configure after)
    p2p_log = logging.getLogger("libp2p")  # has no handler and does not propagate: stderr by default
    if args.verbose >= 2:
        p2p_log.propagate = True
    else:  # routine events of a P2P network (a peer gone, a client without the DHT protocol)
        p2p_log.addHandler(logging.NullHandler())
    try:
        return COMMANDS[args.command](args)
    except (MoemeshError, ValueError, OSError) as e:  # every error of ours and bad input: a line, no traceback
        print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
