"""`retrieval query`: ask a running server with a text or an image, print readable lines or JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from retrieval.client import DEFAULT_ADDRESS, RetrievalClient, search_request
from retrieval.client import filters as F
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
    p.add_argument("--filter", dest="filters", action="append", default=[], type=_filter, metavar="EXPR",
                   help="only items whose stored attribute matches (repeatable, all must hold): field=value, "
                        "field=a|b|c, field>=low, field<=high, field=low..high; a value is a number or an ISO date "
                        "when it parses as one, \"quoted\" to force a string")
    p.add_argument("--page-size", type=int, default=0, help="results per page (then --k bounds the whole ranking, "
                                                            "0 for the server's maximum); prints the next page's token")
    p.add_argument("--page-token", default="", help="the token a previous page printed: its next page")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default: %(default)s)")
    p.add_argument("--token", default=os.environ.get("RETRIEVAL_TOKEN"), help="bearer token [env RETRIEVAL_TOKEN]")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect over TLS")
    p.set_defaults(func=run)


def _filter(text: str):
    try:
        return F.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
                query = {"text": args.text}
            else:
                try:
                    query = {"image": open(args.image, "rb").read()}
                except OSError as e:
                    print(f"retrieval query: error: cannot read {args.image}: {e.strerror}", file=sys.stderr)
                    return 2
            request = search_request(**query, k=args.k, target=args.target, min_score=args.min_score,
                                     filters=args.filters, page_size=args.page_size, page_token=args.page_token)
            if args.page_size or args.page_token:
                results, token = client.search_page(request)
                print(f"next page: --page-token {token}" if token else "(last page)", file=sys.stderr)
            else:
                results = client.search(request)
    except grpc.RpcError as e:
        print(f"retrieval query: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(json.dumps([r.to_dict() for r in results], indent=2) if args.json else format_results(results))
    return 0
