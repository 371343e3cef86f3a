"""`retrieval query`: ask a running server with a text or an image, print readable lines or JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from retrieval.client import DEFAULT_ADDRESS, RetrievalClient, search_request
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
    p.add_argument("--min-probability", type=float, default=None,
                   help="drop text<->image results whose calibrated match probability is lower (0 to 1); "
                        "says so when none is left")
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
        prob = "" if r.match_probability is None else f"  p {r.match_probability:.2f}"
        lines.append(f"{rank:>3}. cos {r.score:+.4f}  {r.angle_deg:6.2f}°{prob}  #{r.id}  {what}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with RetrievalClient(args.address, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca) as client:
            if args.text is None:
                try:
                    data = open(args.image, "rb").read()
                except OSError as e:
                    print(f"retrieval query: error: cannot read {args.image}: {e.strerror}", file=sys.stderr)
                    return 2
            request = search_request(text=args.text, image=None if args.text is not None else data, target=args.target,
                                     k=args.k, min_score=args.min_score, min_probability=args.min_probability)
            answer = client.search_with_info(request)
    except grpc.RpcError as e:
        print(f"retrieval query: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    results = answer.hits
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(format_results(results) if not answer.no_confident_match else
              f"(no confident match: no result reaches match probability {args.min_probability:g})")
    return 0
