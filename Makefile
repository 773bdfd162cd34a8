# `make demo` (the main job, offline, on the bundled digits) and the tests: `make test` (everything, on the newest
# transformers release the package index serves), `make test-min` (the tests that touch transformers, on the lowest
# release pyproject.toml allows), `make test-fast` (the fast tier, for development). CI runs test and test-min.
# Each environment is created and installed first. TORCH_PIN installs torch before anything else can pull another
# build (the CPU build where the package index serves it, as CI's does); `make test TORCH_PIN=torch` takes the newest.
PYTHON ?= python3
VENV ?= .venv
VENV_MIN ?= .venv-min
PY := $(VENV)/bin/python
PY_MIN := $(VENV_MIN)/bin/python
TORCH_PIN ?= torch==2.13.0
# The lowest supported transformers release (the floor of `transformers>=...` in pyproject.toml).
TRANSFORMERS_MIN ?= 5.22.0
BENCH_DEVICE ?= cpu

.PHONY: install install-min test test-min test-fast demo app lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,conversion,onnx]"
	touch $@

install-min: $(VENV_MIN)/.installed

$(VENV_MIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install --quiet --upgrade pip
	$(PY_MIN) -m pip install --quiet "$(TORCH_PIN)"
	$(PY_MIN) -m pip install --quiet -e ".[dev,onnx]" "transformers==$(TRANSFORMERS_MIN)"
	touch $@

test: install
	$(PY) -c "import transformers; print('transformers', transformers.__version__)"
	$(PY) -m pytest -q

# The fast tier (no end-to-end script runs, no TensorFlow conversion) on the lowest supported release.
test-min: install-min
	$(PY_MIN) -c "import transformers as t; assert t.__version__ == '$(TRANSFORMERS_MIN)', t.__version__; print('transformers', t.__version__)"
	$(PY_MIN) -m pytest -q -m "not slow"

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Pretrain, sample, probe and fine-tune a tiny Image GPT on the bundled digits; prints where every artifact is.
demo: install
	$(PY) examples/demo.py --output_dir demo_output $(DEMO_ARGS)

# The completion app (examples/app.py) on http://127.0.0.1:7860, serving the model `make demo` writes; another
# checkpoint with APP_ARGS="--model openai/imagegpt-small".
app: install
	$(PY) examples/app.py $(APP_ARGS)

# Side by side with transformers' ImageGPT on this machine; rewrites this device's section of benchmarks/RESULTS.md
# (on CPU also the decode-ceiling section).
bench: install
	$(PY) benchmarks/bench.py --device $(BENCH_DEVICE) --output benchmarks/RESULTS.md $(BENCH_ARGS)
	if [ "$(BENCH_DEVICE)" = cpu ]; then $(PY) benchmarks/decode_ceiling.py --compile --update_results benchmarks/RESULTS.md; fi

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
