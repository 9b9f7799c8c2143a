# The two commands a new user needs: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test serve stop
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m demo

test: setup
	.venv/bin/ruff check .
	$(PY) -m pytest -q tests

# TorchServe, then the search page beside it (docs/web.md). IMAGES: the catalogue image folder.
IMAGES ?= data/fashion-mnist/images
serve: setup
	$(PY) -m serving.serve start
	$(PY) -m web.service start --images $(IMAGES)

stop:
	$(PY) -m web.service stop
	$(PY) -m serving.serve stop
