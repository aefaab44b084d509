"""`moemesh` entry point: parse, set up logging, run the subcommand, turn our errors into one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from node.cli.commands import COMMANDS
from node.cli.parser import build_parser
from node.errors import MoemeshError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loudness = min(max(args.verbose - args.quiet, -2), 2)
    level = {-2: logging.CRITICAL, -1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[loudness]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("daemon", "status") or getattr(args, "bootstrap", None):
        import libp2p  # noqa: F401  (importing it resets its logger, so configure after)
    p2p_log = logging.getLogger("libp2p")  # has no handler and does not propagate: stderr by default
    if args.verbose >= 2:
        p2p_log.propagate = True
    else:  # routine events of a P2P network (a peer gone, a client without the DHT protocol)
        p2p_log.addHandler(logging.NullHandler())
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (MoemeshError, ValueError, OSError) as e:  # every error of ours and bad input: a line, no traceback
        print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
