#!/usr/bin/env bash
# Makes sure the services the tests talk to run on loopback: PostgreSQL (5432), Redis (6379).
# Installs them with apt-get when absent (CI machines run as root).
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
  echo "services: nothing answers on 127.0.0.1:$1" >&2
  return 1
}

if ! port_open 5432; then
  if ! command -v pg_ctlcluster >/dev/null; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -n | tail -1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432
fi
echo "services: PostgreSQL on 127.0.0.1:5432"

if ! port_open 6379; then
  if ! command -v redis-server >/dev/null; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
  fi
  mkdir -p /tmp/sluis-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/sluis-redis --logfile /tmp/sluis-redis/redis.log
  wait_port 6379
fi
echo "services: Redis on 127.0.0.1:6379"

# Prometheus is not a service the tests share: each test that needs it starts its own server
# (free port, own data folder). Only the binary must be here.
if ! command -v prometheus >/dev/null; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq prometheus >/dev/null
fi
echo "services: $(prometheus --version 2>&1 | head -1)"
