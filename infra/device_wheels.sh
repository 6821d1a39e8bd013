#!/usr/bin/env bash
# Pack Ray, zarr and the dependencies a GPU machine lacks into one small archive that travels with the
# working tree (which may be at most 64 MiB there, and Ray 2.60's cp312 wheel alone is 79 MB).
#
#   bash infra/device_wheels.sh [OUT_DIR]      # default OUT_DIR: .device (ignored by git)
#
# Writes OUT_DIR/site-cp312.tar.xz: an installed (pip --target) tree of
#   ray 2.60.0 (data + train), zarr 3.1.6, numcodecs 0.16.6 and what they need that the machine does not have
#   (donfig, google-crc32c, jsonschema and its helpers, pydantic for Ray Train, colorful for Ray's logging),
# built for CPython 3.12 manylinux x86_64 (DEVICE_PYTHON=3.11 builds the same for a 3.11 machine, to test it
# here). Removed from Ray: what no job of this project uses (the Java jar, the dashboard's web frontend,
# RLlib, Serve, Ray LLM, Tune's examples, Ray's own tests) and the symbol tables of its binaries.
# Ray Train imports parts of Tune, Ray Data and the dashboard's Python modules, so those stay.
#
# On the GPU machine (the archive named in the run's carry list):
#   python3 -c "import tarfile; tarfile.open('.device/site-cp312.tar.xz').extractall('/tmp/site')"
#   PYTHONPATH=$PWD:/tmp/site python3 benchmarks/device_check.py --out $OUT
# benchmarks/device_check.py --site-archive .device/site-cp312.tar.xz does both steps itself.
set -euo pipefail

OUT=${1:-.device}
PY=${DEVICE_PYTHON:-3.12}
PIP=${PIP:-python3 -m pip}
TAG=cp${PY/./}
WORK=$(mktemp -d /tmp/dvt-device-wheels.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Pinned to the versions the project installs (pyproject.toml) and those resolved with them.
PACKAGES=(
  ray==2.60.0 zarr==3.1.6 numcodecs==0.16.6
  donfig==0.8.1.post1 google-crc32c==1.9.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  colorful==0.5.8
)

$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$WORK/wheels" "${PACKAGES[@]}"
$PIP install --quiet --no-deps --no-compile --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --target "$WORK/site" "$WORK"/wheels/*.whl

SITE="$WORK/site"
RAY="$SITE/ray"
rm -rf "$RAY/jars" "$RAY/dashboard/client" "$RAY/rllib" "$RAY/serve" "$RAY/llm" "$RAY/tune/examples" \
  "$SITE/bin"
find "$SITE" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
# Symbol tables only (--strip-unneeded keeps what the dynamic linker needs).
find "$RAY" -type f \( -name '*.so' -o -name 'gcs_server' -o -name 'raylet' \) -exec strip --strip-unneeded {} +

mkdir -p "$OUT"
ARCHIVE="$OUT/site-$TAG.tar.xz"
tar -C "$SITE" -cf - . | xz -9e -T0 > "$ARCHIVE"
echo "wheels:    $(du -ch "$WORK"/wheels/*.whl | tail -1 | cut -f1)"
echo "installed: $(du -sh "$SITE" | cut -f1) after removals"
echo "archive:   $ARCHIVE $(du -h "$ARCHIVE" | cut -f1) ($(stat -c %s "$ARCHIVE") bytes)"
