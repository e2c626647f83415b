#!/usr/bin/env bash
# Makes sure `promtool` (and the `prometheus` server) are on this machine, from Debian's
# `prometheus` package. Used by tests/deploy and by the Prometheus integration test.
#
#   scripts/ensure_prometheus.sh      # prints the path of promtool
#
# `apt-get update` runs only when the package is not known to apt yet, so a machine with
# fresh package lists installs without touching the network twice. Needs root (or sudo).
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo -n)
  else
    echo "ensure_prometheus.sh: promtool is missing and installing it needs root" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show prometheus >/dev/null 2>&1; then
  echo "==> apt-get update (the prometheus package is not in the package lists yet)" >&2
  "${sudo[@]}" apt-get update -q >&2
fi
echo "==> apt-get install prometheus" >&2
# --no-install-recommends: the server and promtool only, no node exporter or web assets.
"${sudo[@]}" apt-get install -y -q --no-install-recommends prometheus >&2
# Debian's postinst may start the service where an init system runs; the tests start their
# own Prometheus on loopback, so a packaged one that did start is left alone, not killed.
command -v promtool
