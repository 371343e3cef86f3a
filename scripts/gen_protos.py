"""Generate the committed Python stubs of protos/ into retrieval/pb/ (the one way to make them).

    python scripts/gen_protos.py            # rewrite retrieval/pb/
    python scripts/gen_protos.py --out DIR  # write elsewhere (the drift test compares bytes)

protoc (from grpcio-tools, a dev extra) writes `retrieval/v1/retrieval_pb2*.py`; the files are
moved flat into the package and their `from retrieval.v1 import` lines rewritten to
`from retrieval.pb import`, so the stubs import inside the installed package. The output only
depends on the proto and the grpcio-tools version (which the stubs record).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTOS = ["retrieval/v1/retrieval.proto"]
PACKAGE_DIR = REPO / "retrieval" / "pb"
OUTPUTS = ["retrieval_pb2.py", "retrieval_pb2.pyi", "retrieval_pb2_grpc.py"]


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # dev extra: pip install grpcio-tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto in PROTOS:
            # Relative paths: the descriptor records the proto's name, never this machine's paths.
            rc = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{PROTO_ROOT}",
                    f"-I{include}",
                    f"--python_out={tmp}",
                    f"--pyi_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(PROTO_ROOT / proto),
                ]
            )
            if rc != 0:
                raise SystemExit(f"protoc failed on {proto} (exit {rc})")
        gen_dir = Path(tmp) / "retrieval" / "v1"
        for name in OUTPUTS:
            text = (gen_dir / name).read_text()
            text = text.replace("from retrieval.v1 import ", "from retrieval.pb import ")
            (out / name).write_text(text)
            written.append(out / name)
    init = out / "__init__.py"
    init.write_text(
        '"""Generated gRPC stubs of protos/retrieval/v1/retrieval.proto: do not edit, run scripts/gen_protos.py."""\n'
    )
    return [init, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
