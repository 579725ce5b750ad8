# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test lint bench clean browser

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

# The editor's browser test drives Debian's chromium through Playwright (Playwright's own browser download is not
# reachable from here); installed with apt when missing (as root, e.g. in CI).
browser:
	@command -v chromium >/dev/null || { \
	  command -v apt-get >/dev/null && export DEBIAN_FRONTEND=noninteractive && \
	  { apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  { echo "the editor's browser test needs chromium: apt-get install chromium (as root)"; exit 1; }

test: lint browser
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks.step --config tiny --batch 2 --steps 10

clean:
	rm -rf $(VENV) outputs
