# The two commands a new user needs: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test serve stop
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m demo

test: setup
	$(PY) -m pytest -q tests

serve: setup
	$(PY) -m serving.serve start

stop:
	$(PY) -m serving.serve stop
