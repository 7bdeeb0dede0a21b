# ftlab: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# cpu: installs paddlepaddle (CPU). gpu: expects paddlepaddle-gpu already in the venv.
PADDLE ?= cpu
comma := ,
EXTRAS := $(if $(filter cpu,$(PADDLE)),cpu$(comma)dev,dev)
STAMP := $(VENV)/.installed-$(PADDLE)

.PHONY: help install train test test-fast test-full test-hf test-matrix lint format docs bench bench-data bench-pref bench-qlora bench-methods bench-plan bench-published bench-long bench-overhead bench-fast-path bench-startup lock clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install ftlab with pinned dependencies

train: $(STAMP) ## Fine-tune the shipped model on the demo task (LoRA, CPU, ~20 s quiet)
	$(VENV)/bin/ftlab $(ARGS)

# Every core (pytest-xdist), one test file per worker at a time, the long files first
# (tests/conftest.py), each worker pinned to its own core (so are the ftlab processes it
# starts). Quiet, 2 cores, 2026-12-03: 1,107 passed + 31 skipped in 342 s (CPU 655 s); an hour
# later, 1,112 passed in 422 s (CPU 823 s; the machine 10-15% slower on a fixed workload);
# the final tree of that day, 1,113 passed in 340 s (CPU 654 s). Later that day, with the
# CPU layers, in-process predict/merge calls, trimmed evals and early refusals: 1,121
# passed in 318 s (CPU 592 s), 306 s (CPU 580 s), 349 s (CPU 668 s) and 294 s (CPU 543 s),
# four quiet runs. With most ftlab runs forked from a server that imported Paddle once
# (tests/helpers.py run_ftlab_forked): 239, 289, 278 and 271 s (CPU 380, 461, 421 and 409 s).
test: $(STAMP) ## Run the default test suite on every core (1,121 tests: 4-5 min on 2 quiet cores)
	$(PY) -m pytest -m "not slow" -n auto --dist loadfile --no-loadscope-reorder $(ARGS)

# The 404 tests marked fast (no Paddle import; tests/conftest.py fails a test that imports
# it), on every core like `test`. 2026-12-03, with tests/helpers.py's composition cache:
# 103 s CPU; serial 112 s wall, -n 2 89 s wall, both at load average 2-3 (others' work);
# quiet, 2 cores: 404 passed in 56 s (CPU 104 s). Before the cache: 122 s CPU, 136 s
# serial quiet.
test-fast: $(STAMP) ## The tests that need no Paddle: compose, validate, plan, auto, CLI (~1 min)
	$(PY) -m pytest -m "fast and not slow" -n auto --dist loadfile $(ARGS)

test-full: $(STAMP) ## Run every test, the slow ones included
	$(PY) -m pytest $(ARGS)

docs: $(STAMP) ## Build the docs site (docs/, mkdocs.yml) into site/; --strict: a broken link or a page not in the nav fails
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict $(ARGS)

# The real Hugging Face client, in its own venv (torch never enters ftlab's).
HF_VENV ?= .venv-hf
HF_PKGS := torch==2.13.0 transformers==4.57.6 peft==0.21.2 safetensors==0.8.0 sentencepiece==0.2.0 "protobuf<7"

$(HF_VENV)/.installed:
	test -x $(HF_VENV)/bin/python || python3 -m venv $(HF_VENV)
	$(HF_VENV)/bin/python -m pip install -q $(HF_PKGS)
	touch $@

test-hf: $(STAMP) $(HF_VENV)/.installed ## Live Hugging Face round trips: transformers + peft read ftlab's exports (own venv)
	FTLAB_HF_PYTHON=$(abspath $(HF_VENV))/bin/python $(PY) -m pytest -m hf_live -s tests/test_hf_live.py $(ARGS)

test-matrix: $(STAMP) ## Pairwise matrix: 54 two-step runs, each completed or refused in one line (~1 h)
	$(PY) tests/matrix.py $(ARGS)

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check ftlab tests bench
	$(VENV)/bin/ruff format --check ftlab tests bench

format: $(STAMP) ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix ftlab tests bench
	$(VENV)/bin/ruff format ftlab tests bench

bench-data: $(STAMP) ## Tokenization + packing: ftlab vs PaddleNLP's dataset path, 100k examples
	$(PY) bench/data_pipeline.py $(ARGS)

bench-pref: $(STAMP) ## Preference data (DPO rows + packing): ftlab vs PaddleNLP's run_dpo.py path
	$(PY) bench/preference_data.py $(ARGS)

bench-qlora: $(STAMP) ## QLoRA (nf4, int8) vs LoRA on a ~100M Llama (ARGS="--size 1b"): bytes, RSS, time
	$(PY) bench/qlora_memory.py $(ARGS)

bench-methods: $(STAMP) ## Every method on the shipped model: params, tokens/s, memory, eval loss, metric
	$(PY) bench/methods.py $(ARGS)

bench-plan: $(STAMP) ## Plan memory estimate vs measured peak RSS: methods, optimizers, recompute granularities
	$(PY) bench/plan_vs_measured.py $(ARGS)

bench-published: $(STAMP) ## GPU plan vs published memory figures, step time vs published throughputs (ARGS="--cpu": this machine's steps)
	$(PY) bench/plan_vs_published.py $(ARGS)

bench-long: $(STAMP) ## Long packed rows (512/2048/8192): dense mask vs FlashMask indices, ftlab vs PaddleNLP
	$(PY) bench/long_sequence.py $(ARGS)

bench-startup: $(STAMP) ## Time ftlab --help, mode=plan and the default run, split by phase (CPU and wall)
	$(PY) bench/startup.py $(ARGS)

bench-overhead: $(STAMP) ## ftlab vs a plain PaddleNLP script on the same LoRA SFT and DPO work (A B alternating, medians)
	$(PY) bench/overhead.py $(ARGS)

bench-fast-path: $(STAMP) ## The CPU fast path before/after: default run, 2048-token FlashMask step, QLoRA step
	$(PY) bench/cpu_fast_path.py $(ARGS)

bench: bench-data bench-pref bench-qlora bench-methods bench-plan bench-published bench-long bench-overhead bench-fast-path bench-startup ## All benchmarks (an hour or more on 2 cores)

lock: ## Rewrite constraints.txt from the current venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^ftlab' > constraints.txt

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs site .pytest_cache .ruff_cache
