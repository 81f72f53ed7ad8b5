#!/usr/bin/env bash
# Prints, one a line, the Debian (or Ubuntu) packages that own the shared
# libraries the given binaries load, as `ldd` and `dpkg -S` find them on the
# machine that built them. The images' build stages run it so that their
# runtime stages install exactly these, whatever the distribution's package
# names (libgrpc++1.51 on Debian 12, libgrpc++1.51t64 on Ubuntu 24.04).
#
# Usage: runtime_packages.sh BINARY...
set -euo pipefail
(($#)) || { echo "usage: $0 BINARY..." >&2; exit 64; }

# owner PATH: the package owning PATH, trying the merged-/usr twin of the
# path too (dpkg records /lib/... for some libraries that ldd finds in
# /usr/lib/..., and the other way round).
owner() {
  local path candidates=("$1" "$(readlink -f "$1")")
  for path in "${candidates[@]}"; do
    candidates+=("${path#/usr}" "/usr$path")
  done
  for path in "${candidates[@]}"; do
    if found=$(dpkg-query -S "$path" 2>/dev/null); then
      echo "${found%%:*}"
      return 0
    fi
  done
  echo "runtime_packages: no package owns $1" >&2
  return 1
}

# The GPU driver's libraries come from the host at run time (the NVIDIA
# container toolkit mounts them), not from a package of the image.
listing=$(ldd "$@" | grep -vE '^\s*(libcuda|libnvidia-[a-z-]+)\.so')
if grep -q "not found" <<<"$listing"; then
  echo "runtime_packages: missing libraries:" >&2
  grep "not found" <<<"$listing" >&2
  exit 1
fi
packages=()
for library in $(awk '$2 == "=>" && $3 ~ /^\// {print $3}' <<<"$listing" | sort -u); do
  packages+=("$(owner "$library")")
done
printf '%s\n' "${packages[@]}" | sort -u
