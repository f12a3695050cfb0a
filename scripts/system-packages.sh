#!/usr/bin/env bash
# Debian packages the tests drive for real: Prometheus (promtool, a scraping server), Chromium
# (the dashboard test), PostgreSQL and Redis (the shared state's backends; tests start their own
# servers) and HAProxy (the multi-replica test bed). Installs only what is missing, so a prepared
# machine pays nothing.
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing ${missing[*]} (apt-get)" >&2
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    "${missing[@]}" >/dev/null
fi
