# servekit's production image: docs/deploy.md says how to run it; tests/test_deploy.py checks what this file states.
#
#   docker build -t servekit:0.1.0 .
#   docker run --rm --stop-timeout 40 -p 127.0.0.1:8080:8080 -p 127.0.0.1:8082:8082 -v "$PWD/model_store:/models:ro" servekit:0.1.0
#
# podman build keeps HEALTHCHECK only with --format docker (the OCI image format has no health check).
#
# CUDA: the torch wheels of a CUDA index carry the CUDA runtime, so only the index changes (one that torch 2.13.0 is
# built for; the host needs the NVIDIA driver and container toolkit; run with --gpus all):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t servekit:0.1.0-cu128 .
# BASE_IMAGE replaces python:3.11-slim in both stages, e.g. with an image built FROM nvidia/cuda that has Python 3.11
# as `python` (with venv) at the same path in both stages.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, alone, from its own index (CPU by default), so that installing servekit does not pull another build;
# its dependencies come with servekit's, below
RUN pip install torch==2.13.0 --no-deps --index-url "$TORCH_INDEX_URL"
WORKDIR /src
# the sources that .dockerignore lets into the build context
COPY . .
# Every package at the version the tests ran with (constraints.txt, written by deploy/constraints.py), so that a
# rebuild makes the same image. numpy is no dependency of servekit, but handlers expect it: TorchServe's images have
# it, tensor.numpy() and torch.from_numpy() need it, and without it torch warns at import in every worker.
RUN pip install --constraint constraints.txt . numpy

FROM ${BASE_IMAGE}
# tini as PID 1 passes SIGTERM on to servekit (which then drains) and reaps orphaned grandchildren of workers
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 servekit \
    && useradd --create-home --uid 10001 --gid servekit servekit
COPY --from=builder /opt/venv /opt/venv
COPY configs/container.properties /etc/servekit/config.properties
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# key_file.json (token auth) and logs/config/snapshot.json are written here
WORKDIR /home/servekit
VOLUME ["/models"]
# inference and metrics; management (8081) listens on 127.0.0.1 inside the container (container.properties)
EXPOSE 8080 8082
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=2)"]
ENTRYPOINT ["tini", "--", "servekit"]
CMD ["start", "--foreground", "--ts-config", "/etc/servekit/config.properties"]
