#!/usr/bin/env bash
# Download, into .whl/, the wheels the lent GPU machines lack, so that a session with a device can
# run `flashnet bench gpu` in one call (docs/benchmarks/gpu.md has that call; it is printed at the end).
#
# The machines (one H100 or H200, Python 3.12, x86-64, no network) hold the distributions listed in
# scripts/gpu-image-packages.txt. scripts/gpu_wheels.py derives what to carry: the project's core and
# `train` dependencies, closed over their own requirements, less that list (today webdataset and
# braceexpand for the shard reader, simplejpeg for CPU decoding, submitit for the launcher, and
# jsonschema with referencing, jsonschema-specifications and rpds-py for flashnet.config).
# Versions: the pin in constraints.txt (what CI tests), else the version installed in .venv.
# Pure-Python wheels fit any platform; compiled ones (simplejpeg, rpds-py) must be CPython 3.12 manylinux.
#
#   scripts/gpu-bench-prepare.sh          (PYTHON=... to use another interpreter's pip)
set -euo pipefail

cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=.whl  # ignored by .gitignore; the run command carries it
MAX_TOTAL_BYTES=$((16 * 1024 * 1024))  # the working tree that travels is capped at 64 MiB in all

# name==version a line: what the device image lacks of the project's needs (scripts/gpu_wheels.py).
mapfile -t CARRIED < <("$PYTHON" scripts/gpu_wheels.py)
PACKAGES=()
((${#CARRIED[@]})) || { echo "scripts/gpu_wheels.py named no wheels" >&2; exit 1; }
for pinned in "${CARRIED[@]}"; do PACKAGES+=("${pinned%%==*}"); done

# One version per package: two wheels of one name stop the whole install on the device.
remove_other_versions() {
    local name=$1 version=$2 wheel
    shopt -s nullglob
    # wheel file names spell a name's hyphens as underscores (PEP 427)
    for wheel in "$WHEELS/${name//-/_}"-*.whl; do
        [[ $(basename "$wheel") == "${name//-/_}-${version}-"* ]] || { echo "removing stale $wheel"; rm -f "$wheel"; }
    done
    shopt -u nullglob
}

mkdir -p "$WHEELS"
for pinned in "${CARRIED[@]}"; do
    name=${pinned%%==*} version=${pinned##*==}
    remove_other_versions "$name" "$version"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${name}==${version}"
done

echo "wheels in $WHEELS/ (and what each needs; all else is on the machines, scripts/gpu-image-packages.txt):"
total=0
for name in "${PACKAGES[@]}"; do
    for wheel in "$WHEELS/${name//-/_}"-*.whl; do
        bytes=$(stat -c %s "$wheel")
        total=$((total + bytes))
        needs=$("$PYTHON" -c "
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
    lines = z.read(meta).decode().splitlines()
print(', '.join(l.split(':', 1)[1].strip() for l in lines if l.startswith('Requires-Dist:') and 'extra ==' not in l) or '-')
" "$wheel")
        printf '  %-60s %8d bytes  needs: %s\n' "$(basename "$wheel")" "$bytes" "$needs"
    done
done
awk -v bytes="$total" 'BEGIN { printf "  total %d bytes (%.2f MiB)\n", bytes, bytes / 1048576 }' 
if ((total > MAX_TOTAL_BYTES)); then
    echo "error: the wheels exceed $((MAX_TOTAL_BYTES / 1048576)) MiB; the device call carries at most 64 MiB" >&2
    exit 1
fi

echo
echo "device call (docs/benchmarks/gpu.md): run with carry [\".whl\"], timeout_s 600, command:"
sed -n '/<!-- run-command -->/,/<!-- \/run-command -->/p' docs/benchmarks/gpu.md | grep -v -- '<!--' | grep -v '^```'
