# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test lint bench clean system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m jobs.demo

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# What the tests need from Debian beside the venv, installed with apt when missing (as root, e.g. in CI): chromium
# (the editor's browser tests drive it through Playwright, whose own browser download is not reachable from here),
# PostgreSQL (the MLflow server's store on the test bed of docker/compose.yaml, tests/compose_bed.py) and nginx (the
# editor's gateway there). An nginx that apt started as a service is stopped again: the bed runs its own.
system-deps:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	  [ -z "$$missing" ] || { \
	    command -v apt-get >/dev/null && export DEBIAN_FRONTEND=noninteractive && \
	    { apt-get install -y -q $$missing >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; }; }; } || \
	  { echo "the tests need$$missing: apt-get install$$missing (as root)"; exit 1; }; \
	  case "$$missing" in *nginx*) /usr/sbin/nginx -s quit 2>/dev/null || true;; esac

test: lint system-deps
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks.step --config tiny --batch 2 --steps 10

clean:
	rm -rf $(VENV) outputs
