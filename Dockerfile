# splice serve on a CUDA base image. Not built or run where it was written (no Docker engine
# there): read it as a starting point. Build and run:
#   docker build -t splice-serve .
#   docker run --gpus all -p 8000:8000 -e SPLICE_API_KEY=... -v /srv/models:/models:ro \
#       -v /srv/adapters:/adapters:ro splice-serve --model /models/my-base --allow-adapter-dir /adapters
# Give `docker stop` (or Kubernetes' terminationGracePeriodSeconds) more time than --drain-timeout
# (default 30 s): SIGTERM drains running requests, then the process exits 0.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/splice/.cache/huggingface HF_HUB_OFFLINE=1

WORKDIR /opt/splice
COPY pyproject.toml README.md ./
COPY splice ./splice
RUN pip install ".[serve]" && useradd --create-home --uid 1000 splice

USER splice
EXPOSE 8000
# /health: the process is alive (liveness); /ready: the model is loaded and the engine runs (readiness)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["splice", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--help"]
