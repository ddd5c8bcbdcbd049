# foldviz — developer entry points.  Prerequisites: GNU make and Python 3.11+ with the venv module
# (Debian/Ubuntu: `sudo apt-get install python3-venv`).
#
#   make app     start the Streamlit workbench (headless; open the printed URL)
#   make test    run the test suite
#   make venv    create .venv and install requirements.txt (only when requirements.txt changed)
#   make train   retrain the bundled demo models into assets/models (deterministic, a few minutes on CPU)

PYTHON      ?= python3
VENV        ?= .venv
PORT        ?= 8501
PYTEST_ARGS ?=
TESTS       ?= tests
PYTEST_TIMEOUT ?= 600
VPY         := $(VENV)/bin/python
STAMP       := $(VENV)/.foldviz-requirements.sha256

.DEFAULT_GOAL := help
.PHONY: help venv app test train clean-venv

help:
	@echo "make app    - start the Streamlit app (http://localhost:$(PORT))"
	@echo "make test   - run the tests (pytest)"
	@echo "make venv   - create/update $(VENV) from requirements.txt"
	@echo "make train  - retrain the bundled demo models (assets/models)"

venv:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || { \
	  echo "error: foldviz needs Python 3.11 or newer as '$(PYTHON)' (found: $$($(PYTHON) --version 2>&1))."; \
	  echo "       Install it, or run e.g. 'make PYTHON=python3.12 ...'."; exit 1; }
	@if [ -x "$(VPY)" ] && ! "$(VPY)" -m pip --version >/dev/null 2>&1; then \
	  echo "$(VENV) is incomplete (no pip); recreating it"; rm -rf "$(VENV)"; fi
	@if [ ! -x "$(VPY)" ]; then \
	  $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	    echo "error: '$(PYTHON) -m venv' is not available (the venv/ensurepip module is missing)."; \
	    echo "       On Debian/Ubuntu: sudo apt-get install python3-venv   (or python3.11-venv), then re-run make."; \
	    exit 1; }; \
	  echo "creating $(VENV) with $$($(PYTHON) --version)"; \
	  $(PYTHON) -m venv "$(VENV)" || { rm -rf "$(VENV)"; \
	    echo "error: could not create $(VENV). On Debian/Ubuntu: sudo apt-get install python3-venv"; exit 1; }; \
	fi
	@want=$$("$(VPY)" -c 'import hashlib, sys; print(hashlib.sha256(open("requirements.txt", "rb").read()).hexdigest() + "-py" + sys.version.split()[0])'); \
	if [ "$$want" = "$$(cat "$(STAMP)" 2>/dev/null)" ]; then \
	  echo "$(VENV) is up to date with requirements.txt"; \
	else \
	  echo "installing requirements.txt into $(VENV) (the first time downloads PyTorch; this takes a while)"; \
	  "$(VPY)" -m pip install --disable-pip-version-check -r requirements.txt && echo "$$want" > "$(STAMP)"; \
	fi

app: venv
	@test -f app.py || { echo "error: app.py not found in $$(pwd)"; exit 1; }
	@echo "Starting foldviz: open http://localhost:$(PORT) in a browser (Ctrl+C stops it)."
	"$(VPY)" app.py --server.headless true --server.port $(PORT)

test: venv
	@"$(VPY)" -m pytest -q --timeout=$(PYTEST_TIMEOUT) --durations=15 $(TESTS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit code 5) — treating this as a failure"; fi; \
	exit $$rc

train: venv
	"$(VPY)" -m foldviz.train --preset all

clean-venv:
	rm -rf "$(VENV)"
