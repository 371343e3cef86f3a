"""Checks of what the server will listen with, made before it loads anything, so that a wrong
setting is one line naming it: an address it cannot bind, a TLS certificate and key that are not
a matching PEM pair. grpc would refuse these later, with messages that name neither the address's
problem nor the file (and its C core logs a line of its own)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from retrieval.errors import ConfigError


def check_can_listen(host: str, port: int, what: str = "gRPC") -> None:
    """ConfigError unless a TCP socket can listen on one of `host`'s addresses at `port` (as grpc
    binds every address `host` resolves to, and succeeds with one). Without SO_REUSEPORT, so a
    port another server holds counts as in use. A check, not a reservation: the server binds
    right after it."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"cannot listen for {what} on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no obstacle
            try:
                s.bind(address)
                s.listen()
                return
            except OSError as e:
                error = error or e
    raise ConfigError(f"cannot listen for {what} on {host}:{port}: {error.strerror if error else 'no address'}")


def check_tls_pair(cert: str, key: str) -> None:
    """ConfigError unless `cert` holds a PEM certificate chain and `key` its unencrypted private
    key (each message names the flag and the file)."""
    texts = {}
    for flag, path in (("tls-cert", cert), ("tls-key", key)):
        try:
            texts[flag] = Path(path).read_text(errors="replace")
        except OSError as e:
            raise ConfigError(f"--{flag} {path}: cannot read it ({e.strerror})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=texts["tls-cert"])
    except ssl.SSLError:
        swapped = "PRIVATE KEY" in texts["tls-cert"]
        raise ConfigError(
            f"--tls-cert {cert}: holds no PEM certificate"
            + (" but a private key: are --tls-cert and --tls-key swapped?" if swapped else "")
        ) from None
    try:  # an encrypted key gets the empty password (and fails) instead of a prompt on the terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        why = (
            "is not the private key of the certificate in --tls-cert"
            if e.reason == "KEY_VALUES_MISMATCH"
            else "holds no unencrypted PEM private key"
        )
        raise ConfigError(f"--tls-key {key}: {why}") from None
