# Shared helpers for scripts/main.sh and scripts/test.sh. Source it; do not run it.
# Everything here is idempotent: on a machine that has what is needed it does nothing.

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# ensure_packages PKG...: installs the Debian packages that are missing (needs root).
ensure_packages() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# ensure_toolchain: cargo (from rustup) plus a C linker for the build.
ensure_toolchain() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found; install Rust with rustup (https://rustup.rs) and retry" >&2
        exit 1
    fi
    command -v cc >/dev/null 2>&1 || ensure_packages gcc libc6-dev
    command -v git >/dev/null 2>&1 || ensure_packages git
}

# ensure_nextest: cargo-nextest, the test runner the suite's test groups need.
ensure_nextest() {
    if ! cargo nextest --version >/dev/null 2>&1; then
        say "installing cargo-nextest (one-time, a few minutes)"
        cargo install cargo-nextest --locked
    fi
}

# ensure_browser: headless Chromium (and a font to draw text with), which the
# status page's browser test (tests/api.rs) renders the page in.
ensure_browser() {
    ensure_packages chromium fonts-dejavu-core
}
