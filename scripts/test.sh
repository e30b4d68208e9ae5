#!/usr/bin/env bash
# Runs the whole test suite exactly as CI does: formatting, lints, every test.
# On a fresh Debian 12 machine run it as root: it installs what it needs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

ensure_toolchain
ensure_nextest
ensure_browser

say "formatting (cargo fmt --check)"
cargo fmt --all --check

say "lints (cargo clippy -D warnings)"
cargo clippy --locked --all-targets -- -D warnings

# The rolling-upgrade test builds the previous release (v0.1.0) before it
# runs: alone first, so that build never competes with other tests for the
# cores; then everything else.
say "rolling-upgrade test (builds v0.1.0 first)"
cargo nextest run --locked --profile ci --test lab_upgrade

say "tests (cargo nextest, profile ci)"
cargo nextest run --locked --profile ci -E 'not binary(lab_upgrade)'

say "doc tests"
cargo test --locked --doc

say "all checks passed"
