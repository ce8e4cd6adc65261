# The two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment on first use (about 3 minutes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come together in one pip command (streaming imports torchvision).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-all demo bench clean-venv check-gpu-triton gpu-triton-venv

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

# The kernels' interpreter tests and the sm_90 compile check under the triton the GPU machine
# has (3.6, not the 3.8 that torch 2.14 brings): an overlay venv holds only that triton and
# reads everything else from $(VENV), so nothing is downloaded but the triton wheel.
GPU_TRITON ?= 3.6.0
OVERLAY ?= .venv-triton-gpu
OVERLAY_STAMP := $(OVERLAY)/.installed-$(GPU_TRITON)
$(OVERLAY_STAMP): $(STAMP)
	@test -x $(OVERLAY)/bin/python || $(BIN)/python -m venv --without-pip $(OVERLAY)
	$(BIN)/python -m pip install --quiet --no-deps --target "$$($(OVERLAY)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" --upgrade triton==$(GPU_TRITON)
	@echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(OVERLAY)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_project_venv.pth"
	$(OVERLAY)/bin/python -c 'import triton; assert triton.__version__ == "$(GPU_TRITON)", triton.__version__'
	@touch $@

gpu-triton-venv: $(OVERLAY_STAMP)

check-gpu-triton: $(OVERLAY_STAMP)
	$(OVERLAY)/bin/python -m pytest -q -p no:cacheprovider tests/test_triton_*.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) $(OVERLAY)
