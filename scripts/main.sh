#!/usr/bin/env bash
# The main job: builds flotilla and shows what it does today, with explanations.
# On a fresh Debian 12 machine run it as root: it installs what it needs.
#
# It checks unit files exactly as the cluster will (names, syntax, [X-Fleet]
# rules, the canonical form and its hash), then boots a lab of 3 hosts running
# real systemd as PID 1, each with sshd and a flotilla daemon, and shows the
# daemons forming a Raft cluster, running units on the hosts' systemd by their
# [X-Fleet] rules, and moving them when a host (the Raft leader's) dies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

ensure_toolchain

say "building flotilla (release)"
cargo build --locked --release
bin=target/release/flotilla
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say "1. every example unit in examples/units/ passes flotilla's checks"
echo "   (one example per [X-Fleet] option; the seed is myapp@.service)"
"$bin" verify examples/units/*.service

say "2. the canonical form: what the cluster stores and 'flotilla cat' prints"
echo "   Comments and layout are dropped; the SHA-256 of this text is the unit's hash,"
echo "   so a change that only touches comments is no change."
"$bin" verify --print examples/units/myapp@.service

say "3. mistakes are reported as FILE:LINE, and the exit code is 1"
cat > "$work/broken.service" <<'UNIT'
[Service]
ExecStart=/bin/sleep infinity
this line has no equals sign

[X-Fleet]
MachineID=0123456789abcdef0123456789abcdef
Global=true
MachineMetadata=disk
UNIT
set +e
"$bin" verify "$work/broken.service"
echo "   -> exit code $?"

say "4. hostile unit names never get near a file system"
cp examples/units/web-v1.service "$work/..service"
cp examples/units/web-v1.service "$work/x.bogus"
"$bin" verify "$work/..service" "$work/x.bogus"
echo "   -> exit code $?"
set -e

say "5. the daemon's configuration: file < FLOTILLA_<KEY> environment < flags"
cat > "$work/flotilla.toml" <<'TOML'
name = "n1"
data_dir = "/var/lib/flotilla"
initial_cluster = "n1=10.0.0.1:4002,n2=10.0.0.2:4002,n3=10.0.0.3:4002"

[metadata]
region = "eu"
TOML
FLOTILLA_LOG=debug "$bin" daemon --check-config --config "$work/flotilla.toml" --metadata disk=ssd

say "6. boot a lab: 3 hosts, each with systemd as PID 1, sshd and flotilla.service"
echo "   (as root; missing Debian packages such as openssh-server are installed and named)"
lab=/tmp/flotilla-main-lab
"$bin" lab down --dir "$lab" >/dev/null 2>&1 || true
trap '"$bin" lab down --dir "$lab" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
up=$("$bin" lab up --hosts 3 --dir "$lab" --election-timeout-ms 300 --ttl 3)
echo "$up"
field() { printf '%s' "$up" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
# The CLI talks to the hosts' API (https, with the lab's CA and admin certificate,
# or its token); member and kv to the store (mutual TLS, the same certificate).
export FLOTILLA_ENDPOINT=$(field endpoint) FLOTILLA_API_TOKEN=$(field api_token)
export FLOTILLA_STORE_ENDPOINT=$(field store_endpoint)
export FLOTILLA_TLS_CA=$(field tls_ca) FLOTILLA_TLS_CERT=$(field tls_cert) FLOTILLA_TLS_KEY=$(field tls_key)
fl() { "$bin" "$@"; }

say "7. the three daemons formed one Raft group; a write to any member is replicated"
fl member list
fl kv put /demo/greeting "hello from the outer machine"
"$bin" lab exec h3 --dir "$lab" -- flotilla --store-endpoint 127.0.0.1:4001 kv get /demo/greeting --serializable

say "8. every host's agent joined (presence lease, TTL 3 s here, 10 s by default)"
fl list-machines

say "9. submit a template with Conflicts=myapp@*.service and start 4 instances on 3 hosts"
echo "   three run, one per host; the fourth waits for a free host"
fl submit examples/units/myapp@.service
fl start --no-block myapp@1 myapp@2 myapp@3 myapp@4   # the fourth could wait for ever
sleep 1.5
fl list-units
for h in h1 h2 h3; do
  printf '   systemd on %s runs: ' "$h"
  "$bin" lab exec "$h" --dir "$lab" -- systemctl list-units 'myapp@*' --state=active --no-legend --plain | awk '{printf "%s ", $1} END {print ""}'
done

say "10. units without rules spread evenly: 6 instances of a plain template, 2 per host"
cat > "$work/hello@.service" <<'UNIT'
[Unit]
Description=hello %i, a unit with no [X-Fleet] rules
[Service]
ExecStart=/bin/sh -c 'while true; do echo "hello %i"; sleep 10; done'
UNIT
fl submit "$work/hello@.service"
fl start hello@1 hello@2 hello@3 hello@4 hello@5 hello@6   # waits until all are active

say "10b. a global unit runs on every host"
fl start examples/units/node-exporter.service   # global: triggered, not waited for
sleep 1
fl list-units

say "11. power off the Raft leader's host (SIGKILL of its PID 1)"
leader=$(fl member list | awk '$4 == "yes" {print $2}')
echo "   leader is on host $leader; killing it. A new leader is elected, the host's"
echo "   lease expires within the TTL (3 s), and its hello units start on the other"
echo "   hosts; its myapp instance has nowhere to go (each survivor already runs one)"
echo "   and waits, exactly as Conflicts= asks."
"$bin" lab kill "$leader" --dir "$lab"
sleep 5
fl member list
fl list-units
echo "   (the data written before is still there:)"
fl kv get /demo/greeting
"$bin" lab status --dir "$lab"

say "12. tear the lab down: no process, mount, namespace, cgroup or interface is left"
"$bin" lab down --dir "$lab"

say "done: see README.md for what comes next"
