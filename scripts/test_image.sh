#!/usr/bin/env bash
# Builds the serving image and checks it from the outside, then stops and removes what it started.
#   1. the image: not root, no test/load/plotting tools, the FAISS variant asked for
#   2. README's run line (inference published, metrics on loopback, nothing else): the health check turns healthy,
#      /ping answers with the key from key_file.json and refuses without it, a photo gets an answer from the version
#      in model_store/, /metrics answers, management listens on loopback inside the container only
#   3. the Kubernetes command (deploy/): a release laid out by deploy.make_release mounted at /mnt/models and
#      `torchserve --foreground` on it: the manifests' readiness command passes, /ping and a photo without a token
#   4. `stop`, after 2 and 3: the container exits within 30 s (SIGTERM reached TorchServe)
# Too slow for every CI run (a cold build downloads about 6 GB): run it by hand before a release, and after any
# change to the Dockerfile, requirements-serve.txt, serving/serve.py or deploy/. See docs/deploy.md.
#
#   make demo && scripts/test_image.sh
#   ENGINE=podman BUILD_OPTS="--pull=never -v /tmp/pipconf:/etc/xdg/pip:ro" scripts/test_image.sh
#   SKIP_BUILD=1 IMAGE=localhost/visual-search:test scripts/test_image.sh      # check an image already built
# Settings: ENGINE (docker|podman), IMAGE, FAISS_VARIANT (gpu|cpu), BUILD_OPTS, RUN_OPTS (e.g. --gpus all),
#           PORT, METRICS_PORT, K8S_PORT (host loopback ports), READY_TIMEOUT (s), SKIP_BUILD, SKIP_K8S.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-$(if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; else echo podman; fi)}
IMAGE=${IMAGE:-localhost/visual-search:test}
FAISS_VARIANT=${FAISS_VARIANT:-gpu}
PORT=${PORT:-18080}
METRICS_PORT=${METRICS_PORT:-18082}
K8S_PORT=${K8S_PORT:-18090}
READY_TIMEOUT=${READY_TIMEOUT:-600}
PY=${PY:-.venv/bin/python}
NAME=visual-search-test-$$
STATE=/var/lib/visual-search
WORK=$(mktemp -d)
T0=$(date +%s)

say() { printf '[%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
# podman without systemd logs that it cannot schedule health checks; they are run here with `healthcheck run`.
quiet() { grep -v 'systemd connection' >&2 || true; }
fail() { say "FAIL: $*"; exit 1; }
cleanup() {
  for c in "$NAME" "$NAME-k8s"; do
    if $ENGINE container exists "$c" 2>/dev/null || $ENGINE inspect "$c" >/dev/null 2>&1; then
      $ENGINE rm -f "$c" >/dev/null 2>&1 || true
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

archives=(model_store/*.mar)
[ -e "${archives[0]}" ] || fail "no model_store/*.mar: run 'make demo' first"
say "engine $ENGINE, image $IMAGE, FAISS $FAISS_VARIANT, archives: ${archives[*]}"

# A 640x480 JPEG photo, as clients send them.
"$PY" - "$WORK/photo.jpg" <<'EOF'
import sys
from tests.fixtures import encode, product_photo
open(sys.argv[1], "wb").write(encode(product_photo("shoes", seed=3, size=(640, 480)), "JPEG", quality=90))
EOF

# ---- 1. build and look inside ---------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  df -h / | tail -1 | awk '{print "disk free before the build: " $4}'
  format=(); [ "$ENGINE" = podman ] && format=(--format docker)   # OCI images drop HEALTHCHECK
  # shellcheck disable=SC2086
  $ENGINE build "${format[@]}" ${BUILD_OPTS:-} --build-arg "FAISS_VARIANT=$FAISS_VARIANT" -t "$IMAGE" . \
    > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "build failed"; }
  say "built $IMAGE ($(tail -1 "$WORK/build.log"))"
fi
$ENGINE image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "image size: %.2f GB\n", $1/1e9}'
[ -n "$($ENGINE image inspect --format '{{.Config.Healthcheck}}' "$IMAGE" | grep -v '<nil>')" ] \
  || fail "the image has no HEALTHCHECK"

$ENGINE run --rm -i "$IMAGE" python - "$FAISS_VARIANT" 2> >(quiet) <<'EOF' || fail "image contents"
import importlib.metadata as md, importlib.util, os, sys
import faiss, torch, torchvision, ts
unwanted = [m for m in ("pytest", "locust", "tensorboard", "matplotlib", "playwright", "fastapi")
            if importlib.util.find_spec(m)]
assert not unwanted, f"test/load/plotting tools in the image: {unwanted}"
gpu_build = hasattr(faiss, "StandardGpuResources")
assert gpu_build == (sys.argv[1] == "gpu"), f"faiss GPU build: {gpu_build}, variant {sys.argv[1]}"
assert os.getuid() != 0, "runs as root"
print(f"inside: uid {os.getuid()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"torchserve {md.version('torchserve')}, faiss {faiss.__version__} ({'GPU' if gpu_build else 'CPU'} build), "
      f"cuda available {torch.cuda.is_available()}, no test tools")
EOF

# ---- 2. README's run line ---------------------------------------------------------------------------------------
# shellcheck disable=SC2086
$ENGINE run -d --name "$NAME" ${RUN_OPTS:-} -p "127.0.0.1:$PORT:8080" -p "127.0.0.1:$METRICS_PORT:8082" "$IMAGE" \
  >/dev/null 2> >(quiet)
say "started $NAME; waiting for the health check"
deadline=$(( $(date +%s) + READY_TIMEOUT ))
until $ENGINE exec "$NAME" python /app/deploy/container/healthcheck.py --state-dir "$STATE" >"$WORK/hc" 2>&1; do
  [ "$($ENGINE inspect --format '{{.State.Running}}' "$NAME")" = true ] \
    || { $ENGINE logs "$NAME" 2>&1 | tail -30; fail "the container exited"; }
  [ "$(date +%s)" -lt "$deadline" ] || { cat "$WORK/hc"; $ENGINE logs "$NAME" 2>&1 | tail -30; fail "not ready"; }
  sleep 5
done
say "health check: $(cat "$WORK/hc")"
$ENGINE logs "$NAME" >"$WORK/log" 2>&1 || true
grep "TorchServe is ready" "$WORK/log" | sed 's/^/  log: /' || true

KEY=$($ENGINE exec "$NAME" cat "$STATE/key_file.json" | jq -r .inference.key)
[ -n "$KEY" ] && [ "$KEY" != null ] || fail "no inference key"
URL=http://127.0.0.1:$PORT

ping=$(curl -sf -H "Authorization: Bearer $KEY" "$URL/ping") || fail "/ping with the key"
[ "$(jq -r .status <<<"$ping")" = Healthy ] || fail "/ping: $ping"
code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/ping")
[ "$code" = 400 ] || [ "$code" = 401 ] || fail "/ping without a key answered $code"
say "/ping: $(jq -c . <<<"$ping") with the key, HTTP $code without it"

# The version the image must serve: the one serving.serve chooses in the container (one archive per model here).
expected=$("$PY" - <<'EOF'
import json
from serving.management import archive_identity
from serving.serve import startup_models
archive = startup_models("model_store", "/nonexistent", require_choice=True)[0].split("=")[1]
model, version = archive_identity(f"model_store/{archive}")
print(json.dumps({"model": model, "model_version": version, "archive": archive}))
EOF
)
answer=$(curl -sf -H "Authorization: Bearer $KEY" -H "Content-Type: image/jpeg" --data-binary "@$WORK/photo.jpg" \
  "$URL/predictions/$(jq -r .model <<<"$expected")") || fail "prediction"
jq -e --argjson want "$expected" '.model == $want.model and .model_version == $want.model_version
    and (.category | type == "string") and (.neighbours | length == 4)
    and all(.neighbours[]; has("id") and has("category") and has("distance"))' <<<"$answer" >/dev/null \
  || fail "answer: $answer (expected $expected)"
say "answer: $(jq -c '{model, model_version, category, confidence, first: .neighbours[0]}' <<<"$answer")"

curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -q '^ts_inference_requests_total' \
  || fail "/metrics on the metrics port"
say "/metrics: answers on the host's loopback, with ts_inference_requests_total"

published=$($ENGINE port "$NAME" | sort | tr '\n' ' ')
[[ "$published" != *8081* ]] || fail "management is published: $published"
$ENGINE exec -i "$NAME" python - <<'EOF' || fail "management listens beyond loopback"
import socket
def open_(host):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, 8081)) == 0
ip = socket.gethostbyname(socket.gethostname())
assert open_("127.0.0.1"), "management is not on loopback"
assert ip.startswith("127.") or not open_(ip), f"management answers on {ip}"
print(f"  management: 127.0.0.1:8081 open, {ip}:8081 closed")
EOF
say "published: $published"

if [ "$ENGINE" = podman ]; then
  podman healthcheck run "$NAME" >/dev/null || fail "podman healthcheck run"
fi
health=unknown
for _ in $(seq 1 40); do
  health=$($ENGINE inspect --format '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo unknown)
  [ "$health" = healthy ] && break
  sleep 3
done
[ "$health" = healthy ] || fail "health status: $health"
say "health status: $health"

t_stop=$(date +%s)
$ENGINE stop -t 60 "$NAME" >/dev/null 2> >(quiet)
status=$($ENGINE inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "$NAME")
stopped=$(( $(date +%s) - t_stop ))
[ "$stopped" -lt 30 ] || fail "stopping took $stopped s: SIGTERM did not reach serving.serve"
say "stopped in $stopped s: $status"
$ENGINE rm "$NAME" >/dev/null 2> >(quiet)

# ---- 3. the Kubernetes command on a release folder ------------------------------------------------------------
if [ "${SKIP_K8S:-0}" != 1 ]; then
  release=$WORK/release
  "$PY" -m deploy.make_release --out "$release" "model_store/$(jq -r .archive <<<"$expected")" \
    --batch-size 4 --max-batch-delay 20 | sed 's/^/  /'
  chmod -R a+rX "$WORK"
  # shellcheck disable=SC2086
  $ENGINE run -d --name "$NAME-k8s" ${RUN_OPTS:-} -p "127.0.0.1:$K8S_PORT:8080" -v "$release:/mnt/models:ro" \
    -e VISUAL_SEARCH_CATALOGUES=/mnt/catalogues "$IMAGE" \
    torchserve --start --foreground --ncs --model-store=/mnt/models/model-store \
    --ts-config=/mnt/models/config/config.properties >/dev/null 2> >(quiet)
  # the manifests' readiness command, inside the container: /ping and a READY worker, no token
  deadline=$(( $(date +%s) + READY_TIMEOUT ))
  until $ENGINE exec "$NAME-k8s" python /app/deploy/container/healthcheck.py --url http://127.0.0.1:8080 \
      >"$WORK/hc" 2>&1; do
    [ "$($ENGINE inspect --format '{{.State.Running}}' "$NAME-k8s")" = true ] \
      || { $ENGINE logs "$NAME-k8s" 2>&1 | tail -30; fail "the Kubernetes-style container exited"; }
    [ "$(date +%s)" -lt "$deadline" ] || { cat "$WORK/hc"; $ENGINE logs "$NAME-k8s" 2>&1 | tail -30; fail "not ready"; }
    sleep 5
  done
  say "readiness command: $(cat "$WORK/hc")"
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$K8S_PORT/ping")
  [ "$code" = 200 ] || fail "/ping without a token answered $code (Kubernetes command)"
  answer=$(curl -sf -H "Content-Type: image/jpeg" --data-binary "@$WORK/photo.jpg" \
    "http://127.0.0.1:$K8S_PORT/predictions/$(jq -r .model <<<"$expected")") || fail "prediction (Kubernetes command)"
  jq -e --argjson want "$expected" '.model_version == $want.model_version and (.neighbours | length == 4)' \
    <<<"$answer" >/dev/null || fail "answer (Kubernetes command): $answer"
  say "Kubernetes command: /ping 200 without a token, answer $(jq -c '{model, model_version, category}' <<<"$answer")"
  t_stop=$(date +%s)
  $ENGINE stop -t 60 "$NAME-k8s" >/dev/null 2> >(quiet)
  stopped=$(( $(date +%s) - t_stop ))
  [ "$stopped" -lt 30 ] || fail "the Kubernetes command took $stopped s to stop: SIGTERM did not reach TorchServe"
  say "stopped in $stopped s: $($ENGINE inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "$NAME-k8s")"
  $ENGINE rm "$NAME-k8s" >/dev/null 2> >(quiet)
fi

say "image checks passed"
