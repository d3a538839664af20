# Two commands: `make run` (set up + main job on built-in data), `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
WORK ?= runs/main
MAX_SECONDS ?= 600

.PHONY: run test setup clean

# The pinned packages, then scr_jax itself (editable: scripts and tests import
# it without any sys.path edits).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VPY) experiments/run.py main --workdir $(WORK) --max-seconds $(MAX_SECONDS)

# The suite without the `slow` CLI fault cases (pytest.ini); those:
# $(VPY) -m pytest -q -m slow tests/test_faults.py
test: setup
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
