#!/usr/bin/env bash
# promtool on deploy/prometheus: configurations (one machine, docker-compose,
# Kubernetes), rules, and the rules' unit tests.
# Exits 77 (skipped) only when promtool is not installed.
set -euo pipefail
cd "$1"
if ! command -v promtool >/dev/null; then
  echo "SKIP: promtool is not installed (Debian package prometheus)"
  exit 77
fi
promtool check config prometheus.yml
promtool check config prometheus-compose.yml
promtool check rules alerts.yml
promtool test rules alerts_test.yml
# Some distribution builds of Prometheus leave out Kubernetes discovery.
if output=$(promtool check config prometheus-kubernetes.yml 2>&1); then
  echo "$output"
elif grep -q "kubernetes_sd_configs not found" <<<"$output"; then
  echo "note: this promtool has no Kubernetes discovery; prometheus-kubernetes.yml not checked here"
else
  echo "$output"
  exit 1
fi
