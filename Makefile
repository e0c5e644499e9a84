# `make test` is the one command CI and a new user run: it installs what it needs, then tests.
PYTHON ?= python3
VENV ?= .venv
# Installed first so the package's open `torch>=2.6` range is already satisfied (a CPU build here).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-browser node llama-cpp test test-llama-cpp lint bench bench-gpu demo clean

# Optional extras on top, e.g. `make install EXTRAS=tensorboard` (dev, which `make test` uses, has it).
EXTRAS ?=

install: $(STAMP)
ifneq ($(EXTRAS),)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
endif

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install install-browser node
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# `generate --engine llama.cpp`: llama-cpp-python built from its sdist for this CPU (~8 minutes on 2
# cores), the wheel kept in $(WHEELS) so a second install takes seconds. Not part of `make test`, whose
# llama.cpp-engine tests skip without it; `make test-llama-cpp` builds it and runs them.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/llmkit/wheels
LLAMA_CPP_CMAKE := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

llama-cpp: install
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
	  set -e; mkdir -p $(WHEELS); \
	  $(BIN)/pip install --quiet --only-binary llama-cpp-python --find-links $(WHEELS) "$(LLAMA_CPP_PYTHON)" 2>/dev/null || { \
	    echo "building $(LLAMA_CPP_PYTHON) for this CPU (once, ~8 minutes)" >&2; \
	    CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	      $(BIN)/pip wheel --quiet --no-deps -w $(WHEELS) "$(LLAMA_CPP_PYTHON)"; \
	    $(BIN)/pip install --quiet --only-binary llama-cpp-python --find-links $(WHEELS) "$(LLAMA_CPP_PYTHON)"; }; }

test-llama-cpp: llama-cpp
	$(BIN)/python -m pytest -q tests/test_llamacpp.py

# llama.cpp itself, to check `llmkit export` against (tests/test_export.py): node-llama-cpp's prebuilt
# CPU binaries, pinned (newer releases' lock files may not install here), into a git-ignored folder.
# Only this platform's binary package: the optional CUDA, Vulkan and ARM ones would add 650 MB.
NODE_DIR := .node
NODE_LLAMA_CPP_VERSION := 3.21.1
NODE_STAMP := $(NODE_DIR)/.installed-$(NODE_LLAMA_CPP_VERSION)

node: $(NODE_STAMP)

$(NODE_STAMP):
	@if ! command -v npm >/dev/null; then echo "npm not found: the llama.cpp tests will skip" >&2; exit 0; fi; \
	  set -e; platform=$$(node -p 'process.platform + "-" + process.arch'); \
	  mkdir -p $(NODE_DIR); test -f $(NODE_DIR)/package.json || echo '{"private": true}' > $(NODE_DIR)/package.json; \
	  cd $(NODE_DIR) && npm install --no-audit --no-fund --ignore-scripts --omit=optional --save-exact \
	    node-llama-cpp@$(NODE_LLAMA_CPP_VERSION) @node-llama-cpp/$$platform@$(NODE_LLAMA_CPP_VERSION) >&2; \
	  touch .installed-$(NODE_LLAMA_CPP_VERSION)

# The playground's browser test (tests/test_serve_ui.py) drives Debian's chromium: installed here when
# missing and we are root (CI is); otherwise that test skips and says to run `sudo make install-browser`.
CHROMIUM ?= /usr/bin/chromium
install-browser:
	@if [ ! -x "$(CHROMIUM)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium for the browser test" >&2; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Benchmarks (not tests): each prints a table of ratios against its baseline and writes bench/results/.
bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench

# The GPU checks alone (fine-tuning MFU, batch-1 decoding), for a CUDA machine.
bench-gpu: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.gpu

# Streams verse from the built-in model: no network, no download.
demo: install
	$(BIN)/llmkit generate -m tiny-shakespeare "ROMEO:" -n 120 --stream

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The built-in model: reproduced from the corpus with llmkit's own commands and a fixed seed.
CORPUS ?= ../shared/data/tinyshakespeare.txt
TS_BUILD := build/tiny-shakespeare
TS_MODEL := llmkit/builtin/tiny-shakespeare
# Sized for the budget: <= 10 MB of bf16 weights and <= 20 minutes of training on a 2-core CPU with
# native bf16 (mixed precision auto picks bf16 autocast there). Muon on the blocks' matrices (lr 0.02),
# AdamW on embeddings and norms; dropout 0.2 because ~12 passes over 0.35M tokens overfit without it.
TS_ARGS ?= --n-layer 5 --n-head 4 --n-embd 256 --context 256 --dropout 0.2 --batch-size 8 --max-steps 1900 \
  --warmup-steps 100 --optimizer muon --muon-lr 0.02 --lr 1.5e-3 --weight-decay 0.1 --eval-every 500 \
  --save-every 1000
TS_SHIP := config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json README.md llmkit.json

.PHONY: tiny-shakespeare
tiny-shakespeare: install
	rm -rf $(TS_BUILD) && mkdir -p $(TS_BUILD)
	@# The last 10% of the text is held out: never seen by the tokenizer or the model.
	size=$$(wc -c < "$(CORPUS)"); head -c $$((size * 9 / 10)) "$(CORPUS)" > $(TS_BUILD)/train.txt; \
	  tail -c +$$((size * 9 / 10 + 1)) "$(CORPUS)" > $(TS_BUILD)/val.txt
	$(BIN)/llmkit train-tokenizer $(TS_BUILD)/train.txt -o $(TS_BUILD)/tokenizer --vocab-size 2048
	$(BIN)/llmkit finetune $(TS_BUILD)/train.txt --val-file $(TS_BUILD)/val.txt -o $(TS_BUILD)/model \
	  -m gpt2 --from-scratch --tokenizer $(TS_BUILD)/tokenizer $(TS_ARGS) \
	  --seed 1337 --save-dtype bfloat16 --no-cache --log-every 25 2> $(TS_BUILD)/train.log
	$(BIN)/llmkit perplexity -m $(TS_BUILD)/model $(TS_BUILD)/val.txt --format json > $(TS_BUILD)/val.json
	rm -rf $(TS_MODEL) && mkdir -p $(TS_MODEL)
	cp $(addprefix $(TS_BUILD)/model/,$(TS_SHIP)) $(TS_BUILD)/train.log $(TS_BUILD)/val.json $(TS_MODEL)/
	cat $(TS_BUILD)/val.json
