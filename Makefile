# Everything a fresh machine with Python 3.11 and make needs: `make demo`, `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test dev emulator bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/normals-pipeline demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The Dagster UI against the emulator on a local folder (the demo's portraits).
dev: $(STAMP)
	$(BIN)/normals-pipeline demo --images 12 >/dev/null
	NORMALS_DATASET=$(CURDIR)/demo-output/portraits NORMALS_OUTPUT=$(CURDIR)/demo-output/dev-output \
	CLIPDROP_API_URL=http://127.0.0.1:8765 CLIPDROP_API_KEY=emulator-key DAGSTER_HOME=$(CURDIR)/.dagster_home \
	sh -c 'mkdir -p $$DAGSTER_HOME && ($(BIN)/normals-pipeline emulator --port 8765 & trap "kill $$!" EXIT; \
	       $(BIN)/dagster dev -w workspace.yaml)'

emulator: $(STAMP)
	$(BIN)/normals-pipeline emulator

clean:
	rm -rf $(VENV) demo-output .dagster_home .pytest_cache .hypothesis
