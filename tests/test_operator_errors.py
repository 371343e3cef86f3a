"""A careless operator's settings: every invalid flag or RETRIEVAL_* variable of `retrieval serve`
is one line on stderr naming it, exit code 2, no traceback, before anything is loaded (the index
root here does not even exist), and a flag and its variable follow the same rules."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.cli import build_parser, main
from retrieval.flags import dataclass_from_args, parse_value
from retrieval.serving.server import ServeConfig

NO_INDEX = "/nonexistent/index-root"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No RETRIEVAL_* variable of the developer's shell reaches these tests."""
    for name in list(os.environ):
        if name.startswith("RETRIEVAL_"):
            monkeypatch.delenv(name)


def serve_fails(capfd, *flags: str) -> str:
    """Runs `retrieval serve` in-process (the index root does not exist); asserts exit code 2 and
    exactly one line on stderr (file-descriptor level: grpc's C core would write there too);
    returns the line."""
    try:
        code = main(["serve", "--index", NO_INDEX, *flags])
    except SystemExit as e:  # argparse's own errors (a malformed flag) exit from parse_args
        code = e.code
    out, err = capfd.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("retrieval serve: error: ", "retrieval: error: "))
    return lines[0]


@pytest.fixture
def busy_port():
    """A port something else listens on (without SO_REUSEPORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "99999"], "--port 99999: must be a port number from 0 to 65535"),
        (["--port", "-1"], "--port -1: must be a port number from 0 to 65535"),
        (["--metrics-port", "70000"], "--metrics-port 70000: must be a port number up to 65535"),
        (["--workers", "0"], "--workers 0: must be at least 1"),
        (["--max-batch", "0"], "--max-batch 0: must be at least 1"),
        (["--max-k", "0"], "--max-k 0: must be at least 1"),
        (["--max-image-batch", "-3"], "--max-image-batch -3: must be at least 1"),
        (["--max-message-mb", "0"], "--max-message-mb 0.0: must be a positive number"),
        (["--max-message-mb", "4096"], "--max-message-mb 4096.0: must be under 2048"),
        (["--watch-interval-s", "nan"], "--watch-interval-s nan: must be a positive number"),
        (["--grace-s", "-1"], "--grace-s -1.0: must be 0 or more"),
        (["--device", "gpu0"], "--device gpu0: must be a torch device"),
        (["--port", "abc"], "argument --port: 'abc' is not an integer"),
        (["--verify", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_out_of_range_or_malformed_flag(capfd, flags, message):
    assert message in serve_fails(capfd, *flags)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("RETRIEVAL_PORT", "abc", "environment variable RETRIEVAL_PORT: 'abc' is not an integer"),
        ("RETRIEVAL_VERIFY", "ture", "environment variable RETRIEVAL_VERIFY: 'ture' is not a boolean"),
        ("RETRIEVAL_VERIFY", "", "environment variable RETRIEVAL_VERIFY: '' is not a boolean"),
        ("RETRIEVAL_MAX_WAIT_MS", "2ms", "environment variable RETRIEVAL_MAX_WAIT_MS: '2ms' is not a number"),
        ("RETRIEVAL_PORT", "99999", "--port 99999: must be a port number from 0 to 65535"),  # same rules as the flag
        ("RETRIEVAL_WORKERS", "0", "--workers 0: must be at least 1"),
    ],
)
def test_invalid_environment_variable_is_named(capfd, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    assert message in serve_fails(capfd)


def test_a_flag_overrides_an_invalid_variable(monkeypatch):
    monkeypatch.setenv("RETRIEVAL_PORT", "abc")
    monkeypatch.setenv("RETRIEVAL_VERIFY", "ture")
    args = build_parser().parse_args(["serve", "--index", NO_INDEX, "--port", "7000", "--no-verify"])
    config = dataclass_from_args(ServeConfig, args)
    assert (config.port, config.verify) == (7000, False)


@pytest.mark.parametrize(
    "raw, value",
    [(w, True) for w in ("true", "TRUE", "1", "yes", "On", " on ")]
    + [(w, False) for w in ("false", "False", "0", "no", "OFF")],
)
def test_boolean_variables_take_only_the_documented_words(monkeypatch, raw, value):
    monkeypatch.setenv("RETRIEVAL_VERIFY", raw)
    config = dataclass_from_args(ServeConfig, build_parser().parse_args(["serve", "--index", NO_INDEX]))
    assert config.verify is value
    for word in ("ture", "2", "y", "enabled", "none"):
        with pytest.raises(ValueError, match="is not a boolean"):
            parse_value(bool, word)


def test_variables_set_what_flags_set(monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX", NO_INDEX)
    monkeypatch.setenv("RETRIEVAL_PORT", "6000")
    monkeypatch.setenv("RETRIEVAL_MAX_WAIT_MS", "0.5")
    monkeypatch.setenv("RETRIEVAL_VERIFY", "off")
    config = dataclass_from_args(ServeConfig, build_parser().parse_args(["serve"])).validate()
    assert (config.index, config.port, config.max_wait_ms, config.verify) == (NO_INDEX, 6000, 0.5, False)


# -- TLS ------------------------------------------------------------------------------------------------


def test_tls_needs_both_files(capfd, tls_pair):
    cert, key = tls_pair
    assert f"--tls-cert {cert}: needs --tls-key too" in serve_fails(capfd, "--tls-cert", str(cert))
    assert f"--tls-key {key}: needs --tls-cert too" in serve_fails(capfd, "--tls-key", str(key))


def test_swapped_certificate_and_key(capfd, tls_pair):
    cert, key = tls_pair
    line = serve_fails(capfd, "--tls-cert", str(key), "--tls-key", str(cert))
    assert f"--tls-cert {key}: holds no PEM certificate" in line and "swapped" in line


def test_key_of_another_certificate(capfd, tls_pair, tmp_path):
    cert, _ = tls_pair
    other_key = tmp_path / "other-key.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-out", str(other_key)], check=True, capture_output=True)
    line = serve_fails(capfd, "--tls-cert", str(cert), "--tls-key", str(other_key))
    assert f"--tls-key {other_key}: is not the private key of the certificate" in line


def test_encrypted_key_fails_without_a_prompt(capfd, tls_pair, tmp_path):
    cert, key = tls_pair
    encrypted = tmp_path / "encrypted-key.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes128", "-passout", "pass:secret", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    line = serve_fails(capfd, "--tls-cert", str(cert), "--tls-key", str(encrypted))
    assert "holds no unencrypted PEM private key" in line


def test_unreadable_tls_file(capfd, tls_pair, tmp_path):
    cert, key = tls_pair
    assert f"--tls-key {tmp_path}: cannot read it" in serve_fails(
        capfd, "--tls-cert", str(cert), "--tls-key", str(tmp_path)
    )
    missing = tmp_path / "missing.pem"
    assert f"--tls-cert {missing}: cannot read it (No such file or directory)" in serve_fails(
        capfd, "--tls-cert", str(missing), "--tls-key", str(key)
    )


# -- addresses --------------------------------------------------------------------------------------------


def test_grpc_port_in_use_is_named(capfd, busy_port):
    line = serve_fails(capfd, "--port", str(busy_port), "--metrics-port", "-1")
    assert f"cannot listen for gRPC on 127.0.0.1:{busy_port}: Address already in use" in line


def test_metrics_port_in_use_is_named(capfd, busy_port):
    line = serve_fails(capfd, "--port", "0", "--metrics-port", str(busy_port))
    assert f"cannot listen for metrics on 127.0.0.1:{busy_port}: Address already in use" in line


def test_unknown_host(capfd):
    assert "cannot listen for gRPC on host.invalid:0" in serve_fails(capfd, "--host", "host.invalid", "--port", "0")


def test_port_in_use_in_a_real_process_is_one_line(busy_port):
    """The whole process's stderr (logging, grpc's C core) holds the one line, nothing else."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RETRIEVAL_PORT": str(busy_port),
        "RETRIEVAL_METRICS_PORT": "-1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "retrieval.cli", "serve", "--index", NO_INDEX],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [
        f"retrieval serve: error: cannot listen for gRPC on 127.0.0.1:{busy_port}: Address already in use"
    ]
