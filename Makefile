# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?=
ARGS ?=
# Two pytest workers, each test file on one of them: most of a whole-run test's seconds are Ray and actor start-up
# and polling, which leave a core idle that the other worker's test uses (18 min 20 s serially on 2 cores).
PYTEST_ARGS ?= -m "not gpu" -n 2 --dist loadfile

.PHONY: run test setup bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/isostack run $(PRESET) $(ARGS)

# pytest exits 5 when it collected nothing: say so plainly and fail, a suite that ran no test proves nothing.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): the suite is missing" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean-venv:
	rm -rf $(VENV)
