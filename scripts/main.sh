#!/usr/bin/env bash
# The main job: builds flotilla and shows what it does today, with explanations.
# On a fresh Debian 12 machine run it as root: it installs what it needs.
#
# Today flotilla checks unit files exactly as the cluster will: names, syntax,
# [X-Fleet] rules, the canonical form and its hash; and validates the daemon's
# configuration. Booting a real 3-host cluster comes with the Raft store, the
# agent and the lab (see README.md, "Status").
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

say "done: see README.md for what comes next"
