"""`retrieval query`: ask a running server with a text or an image, print readable lines or JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from retrieval.client import DEFAULT_ADDRESS, RetrievalClient
from retrieval.hits import Hit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="query a running server with a text or an image",
                       description="Text queries search the images, image queries search the captions "
                                   "(unless --target says otherwise).")
    p.add_argument("--address", default=os.environ.get("RETRIEVAL_ADDRESS", DEFAULT_ADDRESS),
                   help="server HOST:PORT (default: %(default)s) [env RETRIEVAL_ADDRESS]")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text query")
    what.add_argument("--image", metavar="PATH", help="image file query")
    p.add_argument("--target", choices=["image", "text"], default=None,
                   help="gallery to search (default: the other modality)")
    p.add_argument("--k", type=int, default=5, help="number of results (default: %(default)s)")
    p.add_argument("--min-score", type=float, default=None, help="drop results with a lower cosine")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default: %(default)s)")
    p.add_argument("--token", default=os.environ.get("RETRIEVAL_TOKEN"), help="bearer token [env RETRIEVAL_TOKEN]")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect over TLS")
    p.set_defaults(func=run)


def format_results(results: list[Hit]) -> str:
    if not results:
        return "(no results)"
    lines = []
    for rank, r in enumerate(results, 1):
        what = r.uri if r.modality == "image" else f"{r.caption!r}  [{r.image_uri}]"
        lines.append(f"{rank:>3}. cos {r.score:+.4f}  {r.angle_deg:6.2f}°  #{r.id}  {what}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with RetrievalClient(args.address, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca) as client:
            if args.text is not None:
                results = client.search_text(args.text, k=args.k, target=args.target, min_score=args.min_score)
            else:
                try:
                    data = open(args.image, "rb").read()
                except OSError as e:
                    print(f"retrieval query: error: cannot read {args.image}: {e.strerror}", file=sys.stderr)
                    return 2
                results = client.search_image(data, k=args.k, target=args.target, min_score=args.min_score)
    except grpc.RpcError as e:
        print(f"retrieval query: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(json.dumps([r.to_dict() for r in results], indent=2) if args.json else format_results(results))
    return 0
