# OAML service image.
#   CPU:  docker build -t oaml .
#   GPU:  docker build --build-arg TORCH_INDEX= -t oaml:gpu .   then   docker run --gpus all -p 8000:8000 -e OAML_API_KEYS=key:admin oaml:gpu
# The image listens on 0.0.0.0, so it refuses to start without OAML_API_KEYS (-e OAML_API_KEYS=key:admin)
# unless OAML_ALLOW_UNAUTHENTICATED=true says that an open service is meant.
# The GPU build takes PyPI's default torch wheel, which carries its own CUDA runtime libraries; the
# host's NVIDIA driver reaches the container through the NVIDIA container toolkit (`--gpus all`), so
# the same slim Python base serves both.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=2 \
    OMP_WAIT_POLICY=PASSIVE \
    OAML_HOST=0.0.0.0 \
    OAML_PORT=8000 \
    OAML_DATA_DIR=/data \
    OAML_ENGINE_CACHE=/data/engines

WORKDIR /app
# torch first, from the CPU index unless TORCH_INDEX is emptied for a CUDA build
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install --no-cache-dir "$TORCH_SPEC"; fi
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY oaml ./oaml
COPY weights ./weights
RUN pip install --no-cache-dir -e ".[postgres]"  # editable: weights resolve next to the sources

RUN useradd --create-home --uid 10001 oaml && mkdir -p /data && chown oaml /data
USER oaml
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"
CMD ["oaml", "serve"]
