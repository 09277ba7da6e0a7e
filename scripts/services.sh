#!/usr/bin/env bash
# Makes sure local Redis and PostgreSQL are installed, running and reachable
# the way the default configuration expects them (redis://127.0.0.1:6379,
# postgres://postgres@127.0.0.1:5432), and that the worker's databases exist.
#
# On a fresh Debian machine it installs them with apt-get (as root, or with
# sudo) and starts them without systemd. A PostgreSQL it finds refusing the
# local postgres user over TCP gets trust authentication for 127.0.0.1/::1
# only: this is for a development or CI machine, never for production.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379
DATABASES=("audit_worker" "audit_worker_test")

log() { printf 'services: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Redis: keeps nothing on disk here; tests and the worker only need it up.
if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  log "starting redis-server on 127.0.0.1:$REDIS_PORT"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/audit-worker.log
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null || { log "Redis did not start: see /var/log/redis/"; exit 1; }

# PostgreSQL: start the newest local cluster if nothing answers.
if ! pg_isready -h "$PG_HOST" -p "$PG_PORT" -q; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ]; then log "no PostgreSQL cluster under /etc/postgresql"; exit 1; fi
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 100); do pg_isready -h "$PG_HOST" -p "$PG_PORT" -q && break; sleep 0.1; done
fi
pg_isready -h "$PG_HOST" -p "$PG_PORT" -q || { log "PostgreSQL did not start: see /var/log/postgresql/"; exit 1; }

psql_tcp() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U postgres "$@"; }
if ! PGCONNECT_TIMEOUT=5 psql_tcp -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if [ -n "$version" ] && [ -f "$hba" ] && ! grep -q 'audit-worker dev' "$hba"; then
    log "allowing the local postgres user over TCP (trust for 127.0.0.1/::1; dev/CI only) in $hba"
    as_root sed -i '1i host all all 127.0.0.1/32 trust # audit-worker dev\nhost all all ::1/128 trust # audit-worker dev' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
  fi
fi
psql_tcp -d postgres -tAc 'SELECT 1' >/dev/null || {
  log "cannot connect as postgres@$PG_HOST:$PG_PORT: set AUDIT_WORKER__DATABASE__URL to a working URL"; exit 1; }

for db in "${DATABASES[@]}"; do
  if [ "$(psql_tcp -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != "1" ]; then
    log "creating database $db"
    psql_tcp -d postgres -c "CREATE DATABASE $db" >/dev/null
  fi
done
log "Redis and PostgreSQL are ready"
