# Everything a fresh machine with Python 3.11 and make needs: `make demo`, `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test dev ui-test airflow-install airflow-test emulator bench cluster-up cluster-down clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,cluster]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/normals-pipeline demo

test: $(STAMP)
	$(BIN)/ruff check normals_pipeline tests bench definitions.py deploy
	$(BIN)/python -m pytest -q -n 2

# The Dagster UI (http://127.0.0.1:3000) against the emulator on synthetic portraits of its own (dev-data/portraits).
# `dg dev` (not the superseded `dagster dev`) runs from DAGSTER_HOME, so the only dagster.yaml in the folder it
# starts from is the instance's own (the repo root's copy would warn that it is not the one in use).
DEV_HOME := $(CURDIR)/.dagster_home
DEV_ENV = NORMALS_DATASET=$(CURDIR)/dev-data/portraits NORMALS_OUTPUT=$(CURDIR)/dev-data/enriched \
	CLIPDROP_API_URL=http://127.0.0.1:8765 CLIPDROP_API_KEY=emulator-key DAGSTER_HOME=$(DEV_HOME)
dev: $(STAMP)
	test -d dev-data/portraits || $(BIN)/normals-pipeline portraits dev-data/portraits --count 24
	mkdir -p $(DEV_HOME) && cp dagster.yaml $(DEV_HOME)/dagster.yaml
	$(BIN)/normals-pipeline emulator --port 8765 & emulator=$$!; trap "kill $$emulator" EXIT INT TERM; \
	cd $(DEV_HOME) && $(DEV_ENV) $(CURDIR)/$(BIN)/dg dev -w $(CURDIR)/workspace.yaml

# The browser test (tests/test_ui.py, a few minutes): what `make dev` serves, driven in Debian's Chromium through
# a "Materialize all" backfill of every shard; screenshots in tests/screenshots/. Needs /usr/bin/chromium
# (apt-get install chromium); installs the `ui` extra (playwright, which drives that browser: no download).
UI_STAMP := $(VENV)/.installed-ui
$(UI_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,cluster,ui]'
	touch $(UI_STAMP)

ui-test: $(UI_STAMP)
	@test -x /usr/bin/chromium || { echo "make ui-test needs Debian's Chromium: apt-get install -y chromium" >&2; exit 2; }
	NORMALS_UI_TEST=1 $(BIN)/python -m pytest -q tests/test_ui.py

# The Airflow provider (normals_pipeline.airflow, README "Airflow"): Airflow 3 in the same environment as Dagster
# (constraints.txt pins both), so `.venv-airflow` is a link to `.venv` and `.venv-airflow/bin/airflow` runs it.
AIRFLOW_STAMP := $(VENV)/.installed-airflow
$(AIRFLOW_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,cluster,airflow]'
	ln -sfn $(VENV) .venv-airflow
	touch $(AIRFLOW_STAMP)

airflow-install: $(AIRFLOW_STAMP)

# tests/test_airflow.py (a few minutes): `airflow dags test normals_enrichment` against the emulator on SQLite, a
# Dagster run and an Airflow DAG on one key at once, a mapped task retried after a kill.
airflow-test: $(AIRFLOW_STAMP)
	NORMALS_AIRFLOW_TEST=1 $(BIN)/python -m pytest -q tests/test_airflow.py

emulator: $(STAMP)
	$(BIN)/normals-pipeline emulator

# The benchmark figures of bench/README.md (~12–13 min on 2 cores); writes bench/results/<date>-<host>.json.
bench: $(STAMP)
	$(BIN)/python -m bench

# Several hosts on this machine (deploy/README.md): PostgreSQL instance, RabbitMQ broker, three Celery workers
# sharing the key through Redis, webserver and daemon, the emulator as the API. Prints the UI address.
cluster-up: $(STAMP)
	deploy/cluster.sh up

cluster-down:
	deploy/cluster.sh down

clean:
	rm -rf $(VENV) .venv-airflow demo-output dev-data .dagster_home .pytest_cache .hypothesis
