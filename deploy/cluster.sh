#!/usr/bin/env bash
# The multi-host layout on one machine: `deploy/cluster.sh up | down | status` (make cluster-up / cluster-down).
#
# Three Celery workers stand in for three hosts (own name, own NORMALS_STATE_DIR, the key shared through
# NORMALS_REDIS_URL), plus the Dagster webserver and daemon on a PostgreSQL instance, and the API emulator
# with a strict sliding window unless CLIPDROP_API_URL names an API. Pids and logs go under the run folder
# (deploy/run, or NORMALS_CLUSTER_RUN). Secrets come from the environment only and are never written:
# CLIPDROP_API_KEY (a random stand-in for the emulator when unset), DAGSTER_PG_URL, NORMALS_REDIS_URL.
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DEPLOY")"
BIN="$ROOT/.venv/bin"
export PATH="$BIN:$PATH" # dagster-celery starts `celery` by name
RUN="${NORMALS_CLUSTER_RUN:-$DEPLOY/run}"
WORKERS="${NORMALS_CLUSTER_WORKERS:-3}"
UI_PORT="${NORMALS_CLUSTER_UI_PORT:-3100}"
EMULATOR_PORT="${NORMALS_CLUSTER_EMULATOR_PORT:-8766}"

export DAGSTER_HOME="$RUN/home"
export DAGSTER_PG_URL="${DAGSTER_PG_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/normals_cluster}"
export NORMALS_REDIS_URL="${NORMALS_REDIS_URL:-redis://127.0.0.1:6379/0}"
export NORMALS_CELERY_CONFIG="${NORMALS_CELERY_CONFIG:-$DEPLOY/celery.yaml}"
export NORMALS_DATASET="${NORMALS_DATASET:-$RUN/data/portraits}"
export NORMALS_OUTPUT="${NORMALS_OUTPUT:-$RUN/data/enriched}"
export NORMALS_SHARDS="${NORMALS_SHARDS:-16}"
# Four runs of four shards for the default 16: every worker gets a run, the fourth goes to the first one
# free (deploy/README.md, "Run shape"). One machine's default (16: one run) is unchanged elsewhere.
export NORMALS_SHARDS_PER_RUN="${NORMALS_SHARDS_PER_RUN:-4}"
export CLIPDROP_RPM="${CLIPDROP_RPM:-1200}"

say() { echo "cluster: $*" >&2; }
alive() { [ -f "$RUN/pids/$1" ] && kill -0 "$(cat "$RUN/pids/$1")" 2>/dev/null; }

# Start "$@" as process group leader (its own session: one "host", stopped or killed as a whole), logging to
# logs/<name>.log. Extra environment goes before the command as NAME=value words (through `env`).
start() {
  local name="$1"
  shift
  if alive "$name"; then return; fi
  setsid env "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/pids/$name"
}

up() {
  mkdir -p "$RUN/pids" "$RUN/logs" "$DAGSTER_HOME"
  local name missing=0
  for name in webserver daemon $(seq -f "worker-%g" 1 "$WORKERS"); do alive "$name" || missing=1; done
  if [ "$missing" = 0 ]; then
    say "already up"
    echo "Dagster UI: http://127.0.0.1:$UI_PORT"
    return
  fi
  if [ ! -x "$BIN/dagster-celery" ]; then
    say "no $BIN/dagster-celery: run \`make install\` first"
    exit 2
  fi
  "$BIN/python" "$DEPLOY/services.py" || { say "start the services above (or point the variables elsewhere)"; exit 2; }
  cp "$DEPLOY/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"

  if [ -z "${CLIPDROP_API_URL:-}" ]; then
    # The emulator as the API: strict sliding window at the key's rate, 0.8 s ± 0.2 s per answer.
    export CLIPDROP_API_URL="http://127.0.0.1:$EMULATOR_PORT"
    if alive emulator; then
      [ -n "${CLIPDROP_API_KEY:-}" ] || { say "already up with the emulator's key: run \`make cluster-down\` first"; exit 2; }
    else
      export CLIPDROP_API_KEY="${CLIPDROP_API_KEY:-emulator-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}"
      # Its first line names the key: it goes nowhere; the log gets its errors only.
      setsid "$BIN/normals-pipeline" emulator --port "$EMULATOR_PORT" --rpm "$CLIPDROP_RPM" --window sliding \
        --latency 0.8 --latency-jitter 0.2 --api-key "$CLIPDROP_API_KEY:unlimited" \
        >/dev/null 2>>"$RUN/logs/emulator.log" </dev/null &
      echo $! >"$RUN/pids/emulator"
    fi
  elif [ -z "${CLIPDROP_API_KEY:-}" ]; then
    say "CLIPDROP_API_URL is set: set CLIPDROP_API_KEY too"
    exit 2
  fi
  if [ ! -d "$NORMALS_DATASET" ] && [ "$NORMALS_DATASET" = "$RUN/data/portraits" ]; then
    "$BIN/normals-pipeline" portraits "$NORMALS_DATASET" --count 240 >/dev/null
  fi
  # Create the instance's tables once, before several processes race to (dagster.yaml's storage).
  "$BIN/dagster" instance migrate >>"$RUN/logs/migrate.log" 2>&1
  # The key's pool (`clipdrop` for CLIPDROP_API_KEY: factory.pool_for), one step per worker, set in the instance:
  # on a fresh instance the run queue let a fourth run start while the pool existed only as dagster.yaml's default.
  "$BIN/dagster" instance concurrency set clipdrop "$WORKERS" >>"$RUN/logs/migrate.log" 2>&1

  local index
  for index in $(seq 1 "$WORKERS"); do
    mkdir -p "$RUN/hosts/worker-$index"
    # One step at a time per host (--concurrency 1): a step already keeps the key's rate busy on its own.
    start "worker-$index" NORMALS_STATE_DIR="$RUN/hosts/worker-$index/state" \
      "$BIN/dagster-celery" worker start -A dagster_celery.app -y "$NORMALS_CELERY_CONFIG" -q dagster \
      -n "worker-$index" -- --concurrency 1
  done
  mkdir -p "$RUN/hosts/scheduler"
  start daemon NORMALS_STATE_DIR="$RUN/hosts/scheduler/state" "$BIN/dagster-daemon" run -w "$DEPLOY/workspace.yaml"
  start webserver NORMALS_STATE_DIR="$RUN/hosts/scheduler/state" \
    "$BIN/dagster-webserver" -w "$DEPLOY/workspace.yaml" -h 127.0.0.1 -p "$UI_PORT"

  local waited=0
  until curl -fsS "http://127.0.0.1:$UI_PORT/server_info" >/dev/null 2>&1; do
    if ! alive webserver || [ "$waited" -ge 180 ]; then
      say "the webserver did not come up; see $RUN/logs/webserver.log"
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  status
  for name in daemon $(seq -f "worker-%g" 1 "$WORKERS"); do
    alive "$name" || { say "$name stopped; see $RUN/logs/$name.log"; exit 1; }
  done
  echo "Dagster UI: http://127.0.0.1:$UI_PORT"
}

# Stop each "host" (its whole process group): TERM, then KILL after 30 s. Idempotent.
down() {
  local name pid waited
  for name in webserver daemon $(cd "$RUN/pids" 2>/dev/null && ls -d worker-* 2>/dev/null) emulator; do
    [ -f "$RUN/pids/$name" ] || continue
    pid="$(cat "$RUN/pids/$name")"
    if kill -TERM -- "-$pid" 2>/dev/null; then
      waited=0
      while kill -0 -- "-$pid" 2>/dev/null && [ "$waited" -lt 30 ]; do
        sleep 1
        waited=$((waited + 1))
      done
      kill -KILL -- "-$pid" 2>/dev/null || true
      say "stopped $name"
    fi
    rm -f "$RUN/pids/$name"
  done
}

status() {
  local name
  for name in $(cd "$RUN/pids" 2>/dev/null && ls); do
    if alive "$name"; then say "$name running (pid $(cat "$RUN/pids/$name"))"; else say "$name NOT running"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *)
    echo "usage: $0 up | down | status" >&2
    exit 2
    ;;
esac
