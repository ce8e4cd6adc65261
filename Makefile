# The two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment on first use (about 3 minutes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come together in one pip command (streaming imports torchvision).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-all demo bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PINS) -e '.[dev]'
	# lm-evaluation-harness (for the lm-eval adapter) in a second step: resolving it together
	# with mosaicml-streaming's transformers<5 makes pip backtrack through every release.
	$(BIN)/python -m pip install 'lm_eval==0.4.13'
	@touch $(STAMP)

venv: $(STAMP)

# The CPU suite (GPU and SLURM tests skip themselves when no GPU / cluster is present).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m pretrain.demo

clean-venv:
	rm -rf $(VENV)
