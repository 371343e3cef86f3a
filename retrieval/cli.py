"""`retrieval`: train the heads, calibrate their match probabilities, evaluate on a caption dataset,
serve the index over gRPC, query a server, or run the self-contained demo. `retrieval SUBCOMMAND --help`
explains each."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from retrieval.flags import OneLineErrorParser, run_command


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Off a terminal, progress comes as log lines (retrieval.progress): shown without --verbose too.
    logging.getLogger("retrieval.progress").setLevel(logging.INFO)


def build_parser() -> OneLineErrorParser:
    from retrieval.commands import calibrate, demo, evaluate, health, query, serve, train

    parser = OneLineErrorParser(prog="retrieval", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, calibrate, evaluate, serve, query, health, demo):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["health"]:  # the container's probe: straight there, without importing the model's modules
        from retrieval.commands import health

        return health.main(argv[1:])
    # Offline by default: hub look-ups retry for a long time without network. Set HF_HUB_OFFLINE=0 to allow them.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return run_command("retrieval", args)


if __name__ == "__main__":
    sys.exit(main())
