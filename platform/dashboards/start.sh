#!/usr/bin/env bash
# Start Prometheus and Grafana beside the Ray head on this machine, on 127.0.0.1 only
# (reach them through an SSH tunnel: `ray dashboard cluster.yaml --port 3000 --remote-port 3000`).
#
#   platform/dashboards/start.sh [RAY_SESSION_DIR]        default: /tmp/ray/session_latest
#
# Prometheus scrapes what Ray's service-discovery file lists (prometheus.yml here); Grafana
# serves Ray's own dashboards and bonescan.json from the config Ray's dashboard generates for
# the session, with the session's Prometheus as its data source. Ray's dashboard embeds them
# (it looks for Grafana at localhost:3000 and Prometheus at localhost:9090 by default).
#
# Environment: PROMETHEUS_PORT (9090), GRAFANA_PORT (3000), GRAFANA_HOME (/usr/share/grafana),
# BONESCAN_DASHBOARDS_RUN (pid files, logs and data; /tmp/ray/bonescan-dashboards).
# Stops the processes a previous call started (by their recorded pid), so it can follow every
# `ray start --head`. A missing prometheus or grafana binary is reported and skipped.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
session=$(readlink -f "${1:-/tmp/ray/session_latest}")
run=${BONESCAN_DASHBOARDS_RUN:-/tmp/ray/bonescan-dashboards}
prometheus_port=${PROMETHEUS_PORT:-9090}
grafana_port=${GRAFANA_PORT:-3000}
mkdir -p "$run"

for name in prometheus grafana; do
  if [ -f "$run/$name.pid" ]; then
    pid=$(cat "$run/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done  # free its port
    rm -f "$run/$name.pid"
  fi
done

# Ray's dashboard writes the session's metrics configs a few seconds after `ray start --head`.
for _ in $(seq 60); do
  [ -f "$session/metrics/grafana/grafana.ini" ] && break
  sleep 1
done
[ -f "$session/metrics/grafana/grafana.ini" ] || { echo "no Ray metrics config under $session/metrics (is the dashboard on?)" >&2; exit 1; }

if command -v prometheus > /dev/null; then
  # The session's own discovery file: exact even where several Ray clusters share a machine.
  sed "s#/tmp/ray/prom_metrics_service_discovery.json#$session/prom_metrics_service_discovery.json#" \
    "$here/prometheus.yml" > "$run/prometheus.yml"
  setsid prometheus --config.file="$run/prometheus.yml" --storage.tsdb.path="$run/prometheus-data" \
    --web.listen-address="127.0.0.1:$prometheus_port" < /dev/null > "$run/prometheus.log" 2>&1 &
  echo $! > "$run/prometheus.pid"
  echo "Prometheus: http://127.0.0.1:$prometheus_port (log: $run/prometheus.log)"
else
  echo "prometheus not found: skipping it (Debian/Ubuntu: apt-get install prometheus)" >&2
fi

if command -v grafana-server > /dev/null; then
  cp "$here/bonescan.json" "$session/metrics/grafana/dashboards/bonescan.json"
  GF_SERVER_HTTP_ADDR=127.0.0.1 GF_SERVER_HTTP_PORT=$grafana_port \
    GF_PATHS_DATA="$run/grafana-data" GF_PATHS_LOGS="$run" \
    setsid grafana-server --homepath "${GRAFANA_HOME:-/usr/share/grafana}" \
    --config "$session/metrics/grafana/grafana.ini" web < /dev/null > "$run/grafana.log" 2>&1 &
  echo $! > "$run/grafana.pid"
  echo "Grafana: http://127.0.0.1:$grafana_port (dashboard: bonescan; log: $run/grafana.log)"
else
  echo "grafana-server not found: skipping it (https://grafana.com/docs/grafana/latest/setup-grafana/installation/)" >&2
fi
