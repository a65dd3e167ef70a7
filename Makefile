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
	$(BIN)/ruff check normals_pipeline tests bench definitions.py
	$(BIN)/python -m pytest -q

# The Dagster UI (http://127.0.0.1:3000) against the emulator on synthetic portraits.
DEV_ENV = NORMALS_DATASET=$(CURDIR)/dev-data/portraits NORMALS_OUTPUT=$(CURDIR)/dev-data/enriched \
	CLIPDROP_API_URL=http://127.0.0.1:8765 CLIPDROP_API_KEY=emulator-key DAGSTER_HOME=$(CURDIR)/.dagster_home
dev: $(STAMP)
	test -d dev-data/portraits || $(BIN)/normals-pipeline portraits dev-data/portraits --count 24
	mkdir -p .dagster_home && cp dagster.yaml .dagster_home/dagster.yaml
	$(BIN)/normals-pipeline emulator --port 8765 & emulator=$$!; trap "kill $$emulator" EXIT INT TERM; \
	$(DEV_ENV) $(BIN)/dagster dev -w workspace.yaml

emulator: $(STAMP)
	$(BIN)/normals-pipeline emulator

# The benchmark figures of bench/README.md (~10 min on 2 cores); writes bench/results/<date>-<host>.json.
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo-output dev-data .dagster_home .pytest_cache .hypothesis
