# GPU serving image: the pinned stack, Java 17, and the archives built by `make demo` (model_store/*.mar).
#   make demo                       # builds model_store/visual-search.mar
#   docker build -t visual-search .
#   docker run --gpus all -p 8080:8080 -p 8081:8081 -p 8082:8082 visual-search
# torch's CUDA wheels bring the CUDA runtime; the host needs the NVIDIA driver and container toolkit.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY visual_search/ visual_search/
COPY serving/ serving/
COPY handler/ handler/
COPY config.properties .
COPY model_store/*.mar model_store/

# Inside the container TorchServe must listen on all interfaces for -p to reach it.
# Token authorization stays on.
RUN sed -i 's#http://127.0.0.1:#http://0.0.0.0:#' config.properties

ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility PYTHONUNBUFFERED=1
EXPOSE 8080 8081 8082
# One archive per model (the highest version); keys in /app/.torchserve/key_file.json.
CMD ["python", "-m", "serving.serve", "start", "--foreground", "--state-dir", "/app/.torchserve"]
