#!/usr/bin/env bash
# Builds the CPU image with podman on a machine that can pull no image and has torch only as a
# local wheel. Usage: docker/podman-build-cpu.sh [TAG]   (default localhost/thinkingvit-serve:cpu)
#
#   1. the base image: docker/build-base.sh (debootstrap, cached);
#   2. a build context in a temporary folder with what docker/Dockerfile copies, plus in
#      docker/local/ the CPU torch wheel and the CA bundle pip trusts on this machine;
#   3. podman build with the flags this kind of host needs (see docs/deployment.md).
#
# TORCH_WHEEL (default: torch-*+cpu-cp311-*.whl from $PIP_FIND_LINKS, /opt/wheels or docker/local/)
# and PIP_CERT_FILE (default: pip's configured cert, else Debian's bundle) override the inputs.
set -euo pipefail
TAG=${1:-localhost/thinkingvit-serve:cpu}
BASE=${BASE_IMAGE:-localhost/debian-base:bookworm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PODMAN_FLAGS=(--runtime runc --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

"$ROOT/docker/build-base.sh" "$BASE"

if [ -z "${TORCH_WHEEL:-}" ]; then
    for dir in ${PIP_FIND_LINKS:-} /opt/wheels "$ROOT/docker/local"; do
        TORCH_WHEEL=$(ls "$dir"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -n 1) || true
        [ -n "$TORCH_WHEEL" ] && break
    done
fi
[ -f "${TORCH_WHEEL:-}" ] || { echo "no CPU torch wheel for Python 3.11 found; set TORCH_WHEEL" >&2; exit 1; }
TORCH_VERSION=$(basename "$TORCH_WHEEL" | cut -d- -f2)  # e.g. 2.13.0+cpu
PIP_CERT_FILE=${PIP_CERT_FILE:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -f "$PIP_CERT_FILE" ] || PIP_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

context=$(mktemp -d "${TMPDIR:-/tmp}/thinkingvit-context.XXXXXX")
trap 'rm -rf "$context"' EXIT
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - \
    pyproject.toml README.md model kernels service docker/Dockerfile docker/healthcheck.py docker/local/README.md \
    | tar -C "$context" -xf -
ln "$TORCH_WHEEL" "$context/docker/local/" 2>/dev/null || cp "$TORCH_WHEEL" "$context/docker/local/"
cp "$PIP_CERT_FILE" "$context/docker/local/ca-certificates.crt"

podman build "${PODMAN_FLAGS[@]}" --format docker --pull=never -f "$context/docker/Dockerfile" -t "$TAG" \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_SPEC="torch==$TORCH_VERSION" \
    --build-arg SKIP_DEPS=triton \
    --build-arg PIP_CERT=/local/ca-certificates.crt \
    "$context"
