#!/usr/bin/env bash
# One-time set-up of a fresh Debian 12 machine for actorfs (run as root):
# the system packages the tests and benchmarks use, and actorfs itself with
# its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(fuse3 qemu-system-x86 busybox-static kmod cpio stress-ng fio sqlite3 attr git xz-utils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
# Always refresh the index: the guest test fetches a kernel package with apt-get download.
apt-get update -qq
if ((${#missing[@]})); then
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true
# Debian's own python3 has no pip until python3-pip is installed.
python3 -m pip --version >/dev/null 2>&1 || apt-get install -y -qq python3-pip >/dev/null
# ... nor venv's ensurepip (the real-programs test makes a venv on a mount).
python3 -c 'import ensurepip' 2>/dev/null || apt-get install -y -qq python3-venv >/dev/null
pip_install() {
    python3 -m pip install -q --disable-pip-version-check "$@" && return
    # Debian's own python3 refuses with "externally-managed-environment"
    # (PEP 668); this is a dedicated machine: install into it anyway.
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@"
}
pip_install -e '.[test,bench]'
# The coverage-guided fuzzer (a short run is part of the tests).
pip_install atheris
