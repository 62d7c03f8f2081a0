#!/usr/bin/env bash
# Installs the system packages the tests use (called by `make test`; also usable alone).
#
#   scripts/system-packages.sh            install what is missing, then say what is there
#   scripts/system-packages.sh --check    only check; exit 1 naming what is missing
#
# Needed: the Prometheus server and promtool (Debian/Ubuntu package `prometheus`):
# tests/ops/test_metrics_live.py scrapes a live Ray cluster with a real Prometheus, and
# tests/ops/test_dashboards.py evaluates dashboard queries with `promtool test rules`.
# Ray's own `ray metrics launch-prometheus` downloads a release at run time, which fails
# offline, so the distribution's package is used.
#
# Installation goes through apt-get (as root, else through sudo). Where that is not
# possible the script stops with a message naming the package and the commands it
# needs, and `make test` stops with it: the live metrics tests are real checks and would
# fail without it.
set -euo pipefail

# command -> package that provides it (apt)
commands=(prometheus promtool)
declare -A package=([prometheus]=prometheus [promtool]=prometheus)

missing_commands() {
    local c out=()
    for c in "${commands[@]}"; do
        command -v "$c" >/dev/null 2>&1 || out+=("$c")
    done
    echo "${out[@]:-}"
}

missing_packages() {
    local c out=()
    for c in $(missing_commands); do
        [[ " ${out[*]:-} " == *" ${package[$c]} "* ]] || out+=("${package[$c]}")
    done
    echo "${out[@]:-}"
}

give_up() {
    local pkgs=$1 why=$2
    cat >&2 <<MSG
tide's tests need these system commands: $(missing_commands)
(package: $pkgs on Debian/Ubuntu). $why
Install it yourself, then run \`make test\` again, e.g.:
    sudo apt-get update && sudo apt-get install --no-install-recommends $pkgs
or put a Prometheus release (prometheus and promtool, https://prometheus.io/download/) on PATH.
MSG
    exit 1
}

pkgs=$(missing_packages)
if [[ -z "$pkgs" ]]; then
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    give_up "$pkgs" "They are not installed."
fi

command -v apt-get >/dev/null 2>&1 || give_up "$pkgs" "apt-get was not found, so they cannot be installed here automatically."
if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    give_up "$pkgs" "Installing them needs root, and sudo was not found."
fi

echo "Installing system packages for the tests: $pkgs (apt-get${sudo:+ via sudo})" >&2
apt_install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# A fresh machine may have no package lists yet: refresh them only when the first try fails.
if ! apt_install $pkgs 2>/dev/null; then
    "${sudo[@]}" apt-get update -qq >/dev/null || give_up "$pkgs" "apt-get update failed (no network to the package mirror?)."
    apt_install $pkgs || give_up "$pkgs" "apt-get install failed (see its message above)."
fi

pkgs=$(missing_packages)
[[ -z "$pkgs" ]] || give_up "$pkgs" "apt-get reported success but the commands are still missing."
echo "System packages ready: $(command -v prometheus), $(command -v promtool)" >&2
