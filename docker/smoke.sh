#!/usr/bin/env bash
# Build the asyncframes image and stream frames from a host-side client through
# the container, checking every pixel. Works with no image registry:
#   - installs Docker's engine from Debian's docker.io if it is missing, and starts
#     dockerd with host networking only (no iptables, no bridge) if none is running;
#   - builds the base image locally with debootstrap (Debian + python3) unless
#     $BASE_IMAGE already exists;
#   - builds the project's wheels on the host, so the image build needs no network.
# Needs: python3 with venv and pip on the host; root (or sudo) for the first two
# steps when no Docker engine runs; network access to the Debian mirror and to the
# package index pip uses. Before anything else it checks these and sets up the host
# side the way the README does (python3 -m venv .venv && .venv/bin/pip install -e .)
# unless PYTHON names a ready interpreter. `docker/smoke.sh --preflight` does only that.
# Environment:
#   BASE_IMAGE  base to build on        (default asyncframes-base:bookworm, made here)
#   IMAGE       tag of the image        (default asyncframes:smoke)
#   VIDEOS      host folder to serve    (default ../shared/videos, else a generated clip)
#   PYTHON      host Python with asyncframes installed (default .venv/bin/python, made if missing)
#   DEBIAN_MIRROR                       (default http://deb.debian.org/debian)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
build="$here/.build"
BASE_IMAGE="${BASE_IMAGE:-asyncframes-base:bookworm}"
IMAGE="${IMAGE:-asyncframes:smoke}"
PYTHON_GIVEN="${PYTHON:-}"
PYTHON="${PYTHON:-$repo/.venv/bin/python}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CONTAINER=asyncframes-smoke
PORT=9010
mkdir -p "$build"

say() { echo "smoke: $*"; }
fail() { echo "smoke: cannot run: $*" >&2; exit 1; }
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi  # apt-get, dockerd and debootstrap need root

# The host side: a Python with asyncframes installed, set up as the README does if it is missing.
ensure_python() {
    if [ -n "${PYTHON_GIVEN:-}" ]; then
        [ -x "$PYTHON" ] || fail "PYTHON=$PYTHON is not an executable (unset it to let smoke.sh make $repo/.venv)"
        "$PYTHON" -I -c "import asyncframes" 2>/dev/null \
            || fail "PYTHON=$PYTHON cannot import asyncframes (install the project into it: $PYTHON -m pip install -e $repo)"
    else
        if [ ! -x "$PYTHON" ]; then
            command -v python3 >/dev/null 2>&1 || fail "python3 is not installed (needed on the host: python3 with venv and pip)"
            say "no $PYTHON: setting it up as the README does (python3 -m venv .venv && .venv/bin/pip install -e .)"
            (cd "$repo" && python3 -m venv .venv) || fail "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
        fi
        if ! "$PYTHON" -I -c "import asyncframes" 2>/dev/null; then
            say "installing asyncframes into $(dirname "$(dirname "$PYTHON")")"
            (cd "$repo" && "$PYTHON" -m pip install -q -e .) || fail "pip could not install the project into $PYTHON"
        fi
    fi
    "$PYTHON" -m pip --version >/dev/null 2>&1 || fail "$PYTHON has no pip (needed to build and fetch wheels)"
}

# What the Docker steps need, checked before anything is installed.
check_privileges() {
    if docker info >/dev/null 2>&1; then return; fi
    if [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; then
        fail "no Docker engine runs and installing or starting one needs root: run as root, with passwordless sudo, or start dockerd first"
    fi
    if ! command -v dockerd >/dev/null 2>&1 && ! command -v apt-get >/dev/null 2>&1; then
        fail "no Docker engine, and no apt-get to install Debian's docker.io: install Docker first"
    fi
}

ensure_docker() {
    if docker info >/dev/null 2>&1; then return; fi
    if ! command -v dockerd >/dev/null 2>&1; then
        say "installing Docker's engine from Debian (docker.io)"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    say "starting dockerd (host networking only: no iptables, no bridge)"
    $SUDO nohup dockerd --iptables=false --ip6tables=false --bridge=none >"$build/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    say "dockerd did not start; its log:"; tail -20 "$build/dockerd.log"; exit 1
}

ensure_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    say "building $BASE_IMAGE with debootstrap (Debian bookworm, python3) from $DEBIAN_MIRROR"
    local rootfs="$build/rootfs"
    $SUDO rm -rf "$rootfs"
    $SUDO debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$DEBIAN_MIRROR" >"$build/debootstrap.log" 2>&1 \
        || { tail -20 "$build/debootstrap.log"; exit 1; }
    $SUDO sh -c "rm -rf '$rootfs'/var/cache/apt/archives/*.deb '$rootfs'/var/lib/apt/lists/*"
    $SUDO tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    $SUDO rm -rf "$rootfs"
}

build_wheels() {
    local pyver platform
    pyver="$(docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
    platform="manylinux_2_28_$(uname -m)"
    say "building wheels for Python ${pyver} ($platform) on the host"
    rm -rf "$here/wheels"
    "$PYTHON" -m pip wheel -q --no-deps -w "$here/wheels" "$repo"
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version "$pyver" --platform "$platform" \
        -d "$here/wheels" "$(ls "$here"/wheels/asyncframes_video-*.whl)"
}

pick_videos() {
    if [ -n "${VIDEOS:-}" ]; then echo "$VIDEOS"; return; fi
    if [ -d "$repo/../shared/videos" ]; then (cd "$repo/../shared/videos" && pwd); return; fi
    mkdir -p "$build/videos"
    "$PYTHON" -c "from asyncframes._sample import write_clip; write_clip('$build/videos/sample.mp4', frames=120, gop=30, bframes=2)"
    echo "$build/videos"
}

cleanup() { docker rm -f "$CONTAINER" >/dev/null 2>&1 || true; }

ensure_python
say "host Python: $PYTHON ($("$PYTHON" -I -c 'import asyncframes, sys; print("asyncframes", asyncframes.__version__, "on Python", sys.version.split()[0])'))"
if [ "${1:-}" = "--preflight" ]; then say "preflight passed"; exit 0; fi
check_privileges
ensure_docker
ensure_base
build_wheels
say "building $IMAGE on $BASE_IMAGE"
DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE_IMAGE" -t "$IMAGE" "$here" >/dev/null

videos="$(pick_videos)"
cleanup
trap cleanup EXIT
if "$PYTHON" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
    say "port $PORT is already in use on this host; stop what uses it first"; exit 1
fi
say "running $IMAGE with $videos at /data (read-only)"
docker run -d --name "$CONTAINER" --network host -v "$videos:/data:ro" "$IMAGE" >/dev/null

for _ in $(seq 1 60); do
    status="$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER" 2>/dev/null || echo gone)"
    [ "$status" = healthy ] && break
    if [ "$status" = gone ] || [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" != true ]; then
        say "the container stopped:"; docker logs "$CONTAINER"; exit 1
    fi
    sleep 1
done
[ "$status" = healthy ] || { say "the container never became healthy ($status)"; docker logs "$CONTAINER"; exit 1; }
say "container is healthy (HEALTHCHECK: asyncframes ping)"
uid="$(docker exec "$CONTAINER" id -u)"
[ "$uid" != 0 ] || { say "the server runs as root"; exit 1; }
say "server runs as uid $uid"

"$PYTHON" "$here/smoke_check.py" "tcp://127.0.0.1:$PORT" "$videos"

docker stop -t 10 "$CONTAINER" >/dev/null
say "server log:"; docker logs "$CONTAINER" 2>&1 | sed 's/^/  | /'
code="$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
[ "$code" = 0 ] || { say "the server exited with code $code on SIGTERM"; exit 1; }
say "passed"
