# OAML service image. CPU by default; for NVIDIA GPUs build with a CUDA base and the default torch build:
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 --build-arg TORCH_SPEC=torch --build-arg TORCH_INDEX= .
# (the CUDA base needs python3.11 and pip installed on top; the CPU default below has them.)
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
    OAML_DATA_DIR=/data

WORKDIR /app
# torch first, from the CPU index unless TORCH_INDEX is emptied for a CUDA build
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install --no-cache-dir "$TORCH_SPEC"; fi
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY oaml ./oaml
COPY weights ./weights
RUN pip install --no-cache-dir -e .  # editable: weights resolve next to the sources

RUN useradd --create-home --uid 10001 oaml && mkdir -p /data && chown oaml /data
USER oaml
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"
CMD ["oaml", "serve"]
