"""Generated gRPC stubs of protos/retrieval/v1/retrieval.proto: do not edit, run scripts/gen_protos.py."""
