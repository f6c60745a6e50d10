# OAML service image (needs BuildKit: Docker 23+ uses it by default; DOCKER_BUILDKIT=1 on older engines).
#   CPU:  docker build -t oaml .
#   GPU:  docker build --build-arg TORCH_INDEX= -t oaml:gpu .   then   docker run --gpus all -p 8000:8000 -e OAML_API_KEYS=$KEY:admin oaml:gpu
# The image listens on 0.0.0.0, so it refuses to start without OAML_API_KEYS (-e OAML_API_KEYS=<a key of 16 characters or more>:admin)
# unless OAML_ALLOW_UNAUTHENTICATED=true says that an open service is meant.
# The GPU build takes PyPI's default torch wheel, which carries its own CUDA runtime libraries; the
# host's NVIDIA driver reaches the container through the NVIDIA container toolkit (`--gpus all`), so
# the same slim Python base serves both.
#
# Any Debian-like base with python3 (3.11+) and its venv module works: the project lives in a virtual
# environment (/opt/venv), so a distribution's Python that refuses system-wide pip installs (PEP 668) is
# fine; `make docker-test` builds on a bookworm base made with debootstrap (deploy/docker-base.sh).
# Offline or behind a TLS-inspecting proxy: a torch wheel placed in deploy/wheels/ and named by
# --build-arg TORCH_WHEEL=<file name> is installed instead of TORCH_INDEX's, and a CA bundle handed over
# as the build secret `pip_cert` (--secret id=pip_cert,src=/path/to/ca.pem) is used by pip for that
# build only, never stored in a layer.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=2 \
    OMP_WAIT_POLICY=PASSIVE \
    OAML_HOST=0.0.0.0 \
    OAML_PORT=8000 \
    OAML_DATA_DIR=/data \
    OAML_ENGINE_CACHE=/data/engines

WORKDIR /app
RUN python3 -m venv /opt/venv
# torch first: the wheel TORCH_WHEEL names in deploy/wheels/, else from TORCH_INDEX (PyTorch's CPU index),
# else (TORCH_INDEX emptied) PyPI's default CUDA build; then torch's C++ headers and test binaries go (about
# 190 MB: they serve extension builds and torch's own tests, not inference)
RUN --mount=type=bind,source=deploy/wheels,target=/wheels \
    --mount=type=secret,id=pip_cert \
    set -e; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if [ -n "$TORCH_WHEEL" ]; then pip install "/wheels/$TORCH_WHEEL"; \
    elif [ -n "$TORCH_INDEX" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install "$TORCH_SPEC"; fi; \
    torch_dir="$(python -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')"; \
    rm -rf "$torch_dir/include" "$torch_dir/test"; \
    find "$torch_dir/bin" -type f ! -name torch_shm_manager -delete
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY oaml ./oaml
COPY weights ./weights
# editable: the weights resolve next to the sources. OpenVINO keeps its CPU plugin and ONNX reader only: its
# Intel GPU and NPU plugins, their kernel cache, headers and other model readers are about 80 MB never loaded
RUN --mount=type=secret,id=pip_cert \
    set -e; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install -e ".[server,postgres]"; \
    ov_dir="$(python -c 'import importlib.util as u; print(u.find_spec("openvino").submodule_search_locations[0])')"; \
    rm -rf "$ov_dir/include" "$ov_dir"/libs/libopenvino_intel_gpu_plugin.so "$ov_dir"/libs/libopenvino_intel_npu_plugin.so \
        "$ov_dir"/libs/cache.json; \
    for reader in gguf jax paddle pytorch tensorflow tensorflow_lite; do rm -f "$ov_dir"/libs/libopenvino_${reader}_frontend.so.*; done; \
    python -c 'import openvino as ov; assert "CPU" in ov.Core().available_devices'

RUN useradd --create-home --uid 10001 oaml && mkdir -p /data && chown oaml /data
USER oaml
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python -c "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('OAML_PORT', '8000')).status != 200)"
CMD ["oaml", "serve"]
