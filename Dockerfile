# The serving image: TorchServe 0.12, torch and torchvision, FAISS, the handler's package and Java 17, serving the
# archives built by `make demo` (model_store/*.mar). Nothing for training, tests or load tests.
#
#   make demo                                   # builds model_store/visual-search.mar
#   docker build -t visual-search .             # GPU image: faiss-gpu (CUDA 12 wheels; torch brings CUDA 13)
#   docker build --build-arg FAISS_VARIANT=cpu -t visual-search:cpu .
#   docker run -d --gpus all -p 8080:8080 -p 127.0.0.1:8082:8082 visual-search
#
# Only inference (8080) is published; metrics (8082, no token) on the host's loopback. Management (8081) listens on
# loopback inside the container: `docker exec <container> python -m serving.manage --state-dir
# /var/lib/visual-search list`. An operator who wants it outside adds
# -e TS_MANAGEMENT_ADDRESS=http://0.0.0.0:8081 -p 127.0.0.1:8081:8081. Token authorization stays on; the keys are
# in /var/lib/visual-search/key_file.json. Which version starts: VISUAL_SEARCH_MODELS, else the default recorded
# by serving.manage in /var/lib/visual-search (keep it on a volume), else the only version; several versions and no
# choice stop the start with an error. docs/deploy.md has the details; scripts/test_image.sh builds and checks it.
FROM python:3.11-slim-bookworm

# gpu: faiss-gpu, whose search runs on the GPU the model uses; cpu: faiss-cpu. Same version either way.
ARG FAISS_VARIANT=gpu

# Debian's security updates replace openjdk-17-jre-headless in place, so a pinned version would stop the build
# from resolving within weeks; the Java major version is what matters, and the package name fixes it. Same for tini.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 serve \
 && useradd --system --no-log-init --uid 10001 --gid serve --create-home --home-dir /home/serve serve \
 && install -d -o serve -g serve /var/lib/visual-search

WORKDIR /app
COPY requirements-serve.txt .
RUN case "$FAISS_VARIANT" in gpu|cpu) ;; *) echo "FAISS_VARIANT must be gpu or cpu" >&2; exit 1 ;; esac \
 && sed "s/^faiss-cpu==/faiss-${FAISS_VARIANT}==/" requirements-serve.txt > /tmp/requirements-image.txt \
 && pip install --no-cache-dir -r /tmp/requirements-image.txt \
 && rm /tmp/requirements-image.txt

COPY visual_search/ visual_search/
COPY serving/ serving/
COPY handler/ handler/
COPY deploy/container/healthcheck.py deploy/container/
COPY config.properties .
COPY model_store/*.mar model_store/

# Inference and metrics on the container's interfaces, so that -p reaches them; management stays on 127.0.0.1.
# enable_envvars_config lets an operator move management with TS_MANAGEMENT_ADDRESS. The greps stop the build if
# config.properties ever changes shape.
RUN sed -i -e 's#^inference_address=http://127.0.0.1:#inference_address=http://0.0.0.0:#' \
           -e 's#^metrics_address=http://127.0.0.1:#metrics_address=http://0.0.0.0:#' config.properties \
 && printf '%s\n' '# container: operator settings through TS_* environment variables' 'enable_envvars_config=true' \
      >> config.properties \
 && grep -qx 'inference_address=http://0.0.0.0:8080' config.properties \
 && grep -qx 'management_address=http://127.0.0.1:8081' config.properties \
 && grep -qx 'metrics_address=http://0.0.0.0:8082' config.properties

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LOG_LOCATION=/var/lib/visual-search/logs \
    METRICS_LOCATION=/var/lib/visual-search/logs

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080 8082
# tini as PID 1 passes SIGTERM to the whole process group and reaps the workers: `torchserve --foreground` (the
# Kubernetes command, deploy/) does not handle SIGTERM, and as PID 1 it would ignore it until the kill timeout.
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
HEALTHCHECK --interval=30s --timeout=15s --start-period=300s --retries=3 \
  CMD ["python", "/app/deploy/container/healthcheck.py", "--state-dir", "/var/lib/visual-search"]
CMD ["python", "-m", "serving.serve", "start", "--foreground", "--require-choice", \
     "--state-dir", "/var/lib/visual-search", "--timeout", "600"]
