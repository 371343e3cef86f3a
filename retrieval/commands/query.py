"""`retrieval query`: ask a running server with a text, an image, several weighted texts (a composed
query), a stored item (more like this) or a walk between two texts; print readable lines or JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from retrieval.client import DEFAULT_ADDRESS, RetrievalClient, search_request
from retrieval.client import filters as F
from retrieval.hits import Hit, ItemRef


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="query a running server with a text or an image",
        description="Text queries search the images, image queries search the captions "
        "(unless --target says otherwise).",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RETRIEVAL_ADDRESS", DEFAULT_ADDRESS),
        help="server HOST:PORT (default: %(default)s) [env RETRIEVAL_ADDRESS]",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--text",
        action="append",
        help="text query; repeat it (with --weight, --minus) to compose several on the sphere",
    )
    what.add_argument("--image", metavar="PATH", help="image file query")
    what.add_argument(
        "--like",
        metavar="ID",
        type=int,
        help="more like this: the stored item with this id (of --gallery), itself excluded",
    )
    p.add_argument("--weight", type=float, action="append", help="weight of each --text, in order (default 1)")
    p.add_argument(
        "--minus",
        metavar="TEXT",
        action="append",
        default=[],
        help="push the query away from this text (a negative term, weight -1; repeatable)",
    )
    p.add_argument(
        "--combine",
        choices=["geodesic", "linear"],
        default="geodesic",
        help="how several terms combine: Karcher mean and geodesic steps, or the normalized sum",
    )
    p.add_argument("--gallery", choices=["image", "text"], default="image", help="the gallery of --like's id")
    p.add_argument("--walk-to", metavar="TEXT", help="walk from --text to this text along the great circle")
    p.add_argument("--steps", type=int, default=5, help="steps of --walk-to (default: %(default)s)")
    p.add_argument(
        "--target",
        choices=["image", "text"],
        default=None,
        help="gallery to search (default: the other modality; --like: the item's own)",
    )
    p.add_argument("--k", type=int, default=5, help="number of results (per step for --walk-to; default: %(default)s)")
    p.add_argument("--min-score", type=float, default=None, help="drop results with a lower cosine")
    p.add_argument("--max-angle", type=float, default=None, help="a spherical cap: results within this many degrees")
    p.add_argument("--diversity", type=float, default=None, help="MMR re-ranking in [0, 1] (0: relevance alone)")
    p.add_argument(
        "--dedup-angle", type=float, default=None, help="drop results within this many degrees of a better one"
    )
    p.add_argument(
        "--filter",
        dest="filters",
        action="append",
        default=[],
        type=_filter,
        metavar="EXPR",
        help="only items whose stored attribute matches (repeatable, all must hold): field=value, "
        "field=a|b|c, field>=low, field<=high, field=low..high; a value is a number or an ISO date "
        "when it parses as one, \"quoted\" to force a string",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=0,
        help="results per page (then --k bounds the whole ranking, "
        "0 for the server's maximum); prints the next page's token",
    )
    p.add_argument("--page-token", default="", help="the token a previous page printed: its next page")
    p.add_argument(
        "--min-probability",
        type=float,
        default=None,
        help="drop text<->image results whose calibrated match probability is lower (0 to 1); "
        "says so when none is left",
    )
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
        prob = "" if r.match_probability is None else f"  p {r.match_probability:.2f}"
        lines.append(f"{rank:>3}. cos {r.score:+.4f}  {r.angle_deg:6.2f}°{prob}  #{r.id}  {what}")
    return "\n".join(lines)


def _walk(client: RetrievalClient, args: argparse.Namespace) -> None:
    for step in client.walk(args.text[0], args.walk_to, steps=args.steps, k=args.k, target=args.target):
        if args.json:
            print(
                json.dumps(
                    {
                        "step": step.step,
                        "t": step.t,
                        "angle_deg": step.angle_deg,
                        "results": [r.to_dict() for r in step.hits],
                    }
                ),
                flush=True,
            )
        else:
            print(
                f"step {step.step}  t {step.t:.3f}  {step.angle_deg:6.2f}° from the start\n{format_results(step.hits)}",
                flush=True,
            )


def run(args: argparse.Namespace) -> int:
    texts = args.text or []
    weights = args.weight or []
    if len(weights) > len(texts) or (args.walk_to and len(texts) != 1) or ((args.minus or weights) and not texts):
        print(
            "retrieval query: error: --weight and --minus go with --text (one weight per --text), --walk-to with "
            "one --text",
            file=sys.stderr,
        )
        return 2
    options = {
        "min_score": args.min_score,
        "max_angle_deg": args.max_angle,
        "diversity": args.diversity,
        "dedup_angle_deg": args.dedup_angle,
        "min_probability": args.min_probability,
    }
    try:
        with RetrievalClient(args.address, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca) as client:
            if args.walk_to:
                _walk(client, args)
                return 0
            if args.like is not None:
                query: dict = {"item": ItemRef(args.like, args.gallery)}
            elif len(texts) > 1 or weights or args.minus:
                terms = [(t, weights[i] if i < len(weights) else 1.0) for i, t in enumerate(texts)]
                query = {"terms": terms + [(t, -1.0) for t in args.minus], "combine": args.combine}
            elif texts:
                query = {"text": texts[0]}
            else:
                try:
                    query = {"image": open(args.image, "rb").read()}
                except OSError as e:
                    print(f"retrieval query: error: cannot read {args.image}: {e.strerror}", file=sys.stderr)
                    return 2
            request = search_request(
                **query,
                k=args.k,
                target=args.target,
                filters=args.filters,
                page_size=args.page_size,
                page_token=args.page_token,
                **options,
            )
            no_confident_match = False
            if args.page_size or args.page_token:
                results, token = client.search_page(request)
                print(f"next page: --page-token {token}" if token else "(last page)", file=sys.stderr)
            else:
                answer = client.search_with_info(request)
                results, no_confident_match = answer.hits, answer.no_confident_match
    except grpc.RpcError as e:
        print(f"retrieval query: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(
            format_results(results)
            if not no_confident_match
            else f"(no confident match: no result reaches match probability {args.min_probability:g})"
        )
    return 0
