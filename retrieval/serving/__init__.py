"""The gRPC service: the search engine (model + live index version, hot swap, micro-batched
encoders), the servicer that only translates protobuf, the server with health, reflection, auth,
TLS and Prometheus metrics, and the one mapping from typed errors to status codes."""
