"""The committed stubs in retrieval/pb/ are exactly what scripts/gen_protos.py makes from the proto."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_match_the_proto(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the stubs")
    from importlib.metadata import version

    committed = (REPO / "retrieval" / "pb" / "retrieval_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed).group(1)
    if version("grpcio-tools") != made_with:
        pytest.skip(
            f"stubs were generated with grpcio-tools {made_with}, {version('grpcio-tools')} is installed; "
            f"regenerating would differ in its version stamps only"
        )
    assert grpc_tools
    written = _load_generator().generate(tmp_path)
    for path in written:
        ours = REPO / "retrieval" / "pb" / path.name
        assert ours.is_file(), f"{ours} is missing: run python scripts/gen_protos.py and commit"
        assert ours.read_bytes() == path.read_bytes(), (
            f"{ours} drifted from protos/: run python scripts/gen_protos.py and commit the result"
        )
    assert {p.name for p in (REPO / "retrieval" / "pb").glob("*.py*")} == {p.name for p in written}


def test_stubs_import_inside_the_package():
    from retrieval.pb import retrieval_pb2, retrieval_pb2_grpc

    service = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"]
    assert service.full_name == "retrieval.v1.RetrievalService"
    assert {m.name for m in service.methods} == {"Search", "BatchSearch", "Embed", "GetIndexInfo", "Walk"}
    assert hasattr(retrieval_pb2_grpc, "RetrievalServiceStub")
