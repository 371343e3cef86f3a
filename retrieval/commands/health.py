"""`retrieval health`: is the server SERVING? Asks the standard gRPC health service, over TLS when
RETRIEVAL_TLS_CERT is set (trusting the server's own certificate), in plaintext otherwise; exit
code 0 when SERVING, 1 otherwise, and one line saying which. The container image's HEALTHCHECK
and the compose file's healthcheck run it, configured by the same RETRIEVAL_* variables as
`retrieval serve` (RETRIEVAL_HOST 0.0.0.0 is probed on localhost).

It imports grpc and nothing of the model (no torch): it runs every few seconds beside the server.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from retrieval.errors import ConfigError
from retrieval.flags import OneLineErrorParser, add_dataclass_arguments, dataclass_from_args

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass
class HealthConfig:
    """What `retrieval serve` listens with (the same defaults and variables)."""

    host: str = "127.0.0.1"
    port: int = 50051
    tls_cert: str | None = None


HELP = {
    "host": "address the server listens on (0.0.0.0 or :: is probed on localhost)",
    "port": "the server's gRPC port",
    "tls_cert": "the server's PEM certificate: probe over TLS, trusting it as the root",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(p, HealthConfig, HELP, env_prefix="RETRIEVAL_")
    p.add_argument(
        "--tls-name",
        default=None,
        help="name to check the certificate for (default: its first DNS name, else its common name)",
    )
    p.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=4.0, help="deadline in seconds (default: %(default)s)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="exit 0 when the server answers SERVING on the gRPC health service",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=run)


def certificate_name(cert_file: str) -> str | None:
    """The first DNS name (else the common name) of the first CA certificate in a PEM file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=cert_file)
    for cert in context.get_ca_certs():
        dns = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
        common = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        if dns or common:
            return (dns or common)[0]
    return None


def _channel(config: HealthConfig, tls_name: str | None):
    import grpc

    host = "localhost" if config.host in WILDCARD_HOSTS else config.host
    target = f"{host}:{config.port}"
    if not config.tls_cert:
        return grpc.insecure_channel(target), target
    try:
        with open(config.tls_cert, "rb") as f:
            root = f.read()
        name = tls_name or certificate_name(config.tls_cert)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--tls-cert {config.tls_cert}: cannot read a PEM certificate from it ({e})") from None
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options=options), target


def check(
    config: HealthConfig, service: str = "", timeout: float = 4.0, tls_name: str | None = None
) -> tuple[bool, str]:
    """(serving, one line saying what the server answered or why it did not)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel, target = _channel(config, tls_name)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            details = " ".join((e.details() or "").split())
            return False, f"{target}: {e.code().name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def run(args: argparse.Namespace) -> int:
    try:
        serving, line = check(dataclass_from_args(HealthConfig, args), args.service, args.timeout, args.tls_name)
    except ConfigError as e:
        serving, line = False, f"error: {e}"
    print(f"retrieval health: {line}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="retrieval health", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
