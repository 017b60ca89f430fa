#!/usr/bin/env bash
# A stand-in for the `relay` binary, to test the bench's relay plumbing before the real
# relay exists: RELAY_BIN=bench/fake-relay.sh bench --quick --systems relay --require relay
# It accepts the CLI the bench assumes (issue 4) and forwards with socat; it measures socat,
# not our relay. Every program listens on 127.0.0.1 only.
set -euo pipefail
cmd="${1:-}"; shift || true
case "$cmd" in
  --version) echo "fake-relay (bench test double)";;
  user) # user add NAME --db PATH --password-stdin
        db=""; while [ $# -gt 0 ]; do case "$1" in --db) db="$2"; shift;; esac; shift; done
        cat >/dev/null; [ -n "$db" ] && touch "$db";;
  serve) listen=""; tls=1
        while [ $# -gt 0 ]; do case "$1" in --listen) listen="$2"; shift;; --allow-plain) tls=0; plain="$2"; shift;; esac; shift; done
        if [ "$tls" = 0 ]; then  # the TLS listener stays up too; terminals use the plain one
            socat "TCP-LISTEN:${listen##*:},bind=127.0.0.1,reuseaddr,fork" SYSTEM:"sleep 3600" & listen="$plain"
        fi
        [ "$tls" = 1 ] && echo "relay serve: TLS certificate SHA-256 fingerprint: $(printf 'ab%.0s' $(seq 32))"
        echo "relay serve: listening on $listen"
        exec socat "TCP-LISTEN:${listen##*:},bind=127.0.0.1,reuseaddr,fork" SYSTEM:"sleep 3600";;
  expose) server=""; svc=""
        while [ $# -gt 0 ]; do case "$1" in --server) server="$2"; shift;; --service) svc="$2"; shift;; esac; shift; done
        echo "${svc#*=}" > fake-relay-target   # the working directory is the path's own
        exec socat "TCP:$server" SYSTEM:"sleep 3600";;
  connect) listen=""
        while [ $# -gt 0 ]; do case "$1" in --listen) listen="$2"; shift;; esac; shift; done
        for _ in $(seq 100); do [ -s fake-relay-target ] && break; sleep 0.05; done
        exec socat "TCP-LISTEN:${listen##*:},bind=127.0.0.1,reuseaddr,fork" "TCP:$(cat fake-relay-target)";;
  *) echo "fake-relay: unknown command $cmd" >&2; exit 2;;
esac
