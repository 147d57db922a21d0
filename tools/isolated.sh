#!/usr/bin/env bash
# Run a command in a loopback-only network namespace, so the test suite proves it needs no network.
# Needs root (or user namespaces) and `unshare`; elsewhere it runs the command as it is, with a note.
set -euo pipefail
if command -v unshare >/dev/null 2>&1 && unshare -n true 2>/dev/null; then
  export SELFMOA_NETNS=1
  exec unshare -n bash -c 'ip link set lo up 2>/dev/null || true; exec "$@"' isolated "$@"
fi
if unshare -rn true 2>/dev/null; then
  export SELFMOA_NETNS=1
  exec unshare -rn bash -c 'ip link set lo up 2>/dev/null || true; exec "$@"' isolated "$@"
fi
echo "tools/isolated.sh: no network namespace here; running with the host network" >&2
exec "$@"
