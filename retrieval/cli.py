"""`retrieval`: train the heads, evaluate on a caption dataset, serve the index over gRPC,
query a server, or run the self-contained demo. `retrieval SUBCOMMAND --help` explains each."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from retrieval.flags import run_command


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    from retrieval.commands import demo, evaluate, query, serve, train

    parser = argparse.ArgumentParser(prog="retrieval", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, evaluate, serve, query, demo):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Offline by default: hub look-ups retry for a long time without network. Set HF_HUB_OFFLINE=0 to allow them.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return run_command("retrieval", args)

if __name__ == "__main__":
    sys.exit(main())
