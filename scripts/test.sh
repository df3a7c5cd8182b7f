#!/usr/bin/env bash
# Install lalo and everything its tests need, then run the whole test suite.
# This is the README's test command and exactly what CI (.ci/run) runs.
#   ./scripts/test.sh                 everything (builds llama-server once into the user cache)
#   ./scripts/test.sh -m "not integration"   fast unit tests only
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: a compiler and cmake to build llama-server, Debian's chromium and
# firefox-esr for the dashboard's browser tests (Playwright's own browser downloads need the
# internet; Firefox is driven over WebDriver BiDi), unzip to check llamafiles, and the
# container tools below.
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v chromium >/dev/null || need+=(chromium)
command -v firefox-esr >/dev/null || command -v firefox >/dev/null || need+=(firefox-esr)
command -v unzip >/dev/null || need+=(unzip)
# systemd-analyze checks the unit `lalo service install` writes (no systemd needs to run)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The image target and its test: buildah builds (no daemon), podman runs it with runc; the k8s
# target's test renders the kustomize base with `kubectl kustomize`.
command -v buildah >/dev/null || need+=(buildah)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v kubectl >/dev/null || need+=(kubernetes-client)
# The peers test joins three lalos, each in its own network namespace, with `ip netns`/`ip link`.
command -v ip >/dev/null || need+=(iproute2)
# The portable engine and the frozen lalo are built inside a Debian 11 root made with
# debootstrap (old glibc); objdump reads the glibc versions they need.
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v objdump >/dev/null || need+=(binutils)
# The Windows package (`lalo build --target windows`, tested under wine): the mingw-w64 cross
# compilers for llama-server.exe and lalo's launcher, wine to run them, NSIS for the installer
# (about 1.1 GB installed).
command -v x86_64-w64-mingw32-g++-posix >/dev/null || need+=(g++-mingw-w64-x86-64-posix)
command -v wine >/dev/null || need+=(wine wine64)
command -v makensis >/dev/null || need+=(nsis)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing system packages: ${need[*]}" >&2
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# llama-cpp-python compiles llama.cpp again (its engine's tests need it): on every core, and
# without the multimodal library lalo does not use. pip caches the wheel for later runs.
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
  .venv/bin/python -m pip install -q -e '.[dev,llama-cpp-python,packaging]'
exec .venv/bin/python -m pytest "$@"
