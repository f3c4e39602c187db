#!/usr/bin/env bash
# Build, push and check the DeMix images with Docker, podman or buildah (the Makefile's image
# targets call this; ENGINE chooses, else the first that works of docker, podman, buildah).
#
#   images/images.sh engine                  print the engine that would be used
#   images/images.sh tools                   install podman, runc, buildah, mmdebstrap (apt)
#   images/images.sh base NAME               Debian bookworm base from this machine's apt sources
#   images/images.sh wheelhouse cpu|cuda     build/wheelhouse from requirements/ (host network)
#   images/images.sh build cpu|cuda NAME     the image NAME (BASE= another base, BUILD_FLAGS=)
#   images/images.sh push NAME...            push images to their registry
#   images/images.sh run NAME ARGS...        `ENGINE run` with the sandbox settings
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=build/wheelhouse

die() { echo "images.sh: error: $*" >&2; exit 2; }

engine() {
  if [ -n "${ENGINE:-}" ]; then echo "$ENGINE"
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
  elif command -v podman >/dev/null; then echo podman
  elif command -v buildah >/dev/null; then echo buildah
  else die "no container engine: install Docker, or run 'make images-tools' (podman, buildah, runc)"
  fi
}

# podman and buildah: images/containers.conf and a vfs store of their own (both work in an
# unprivileged sandbox, where overlay mounts and the default ulimits are refused), unless the
# caller chose settings with CONTAINERS_CONF / CONTAINERS_STORAGE_CONF.
sandbox_settings() {
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/images/containers.conf}
  if [ -z "${CONTAINERS_STORAGE_CONF:-}" ]; then
    local conf=build/containers/storage.conf root run
    if [ "$(id -u)" = 0 ]; then
      root=/var/lib/containers/demix-vfs run=/run/containers/demix-vfs
    else
      root=${XDG_DATA_HOME:-$HOME/.local/share}/containers/demix-vfs
      run=${XDG_RUNTIME_DIR:-/tmp/containers-$(id -u)}/demix-vfs
    fi
    mkdir -p "$(dirname "$conf")"
    printf '[storage]\ndriver = "vfs"\ngraphroot = "%s"\nrunroot = "%s"\n' "$root" "$run" >"$conf"
    export CONTAINERS_STORAGE_CONF=$PWD/$conf
  fi
}

tools() {
  local missing=()
  for tool in podman runc buildah mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} = 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    die "missing ${missing[*]}: install them (Debian/Ubuntu: sudo apt-get install ${missing[*]})"
  fi
}

base() {
  # The machine's own apt sources (deb822 or one-line), so that no mirror is named anywhere.
  local name=$1 sources tar=build/base/bookworm.tar
  sources=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 || true)
  sources=${APT_SOURCES:-${sources:-/etc/apt/sources.list}}
  [ -r "$sources" ] || die "no apt sources file at $sources; set APT_SOURCES=FILE"
  mkdir -p build/base
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1 \
    bookworm "$tar" "$sources"
  local e c; e=$(engine)
  [ "$e" = docker ] || sandbox_settings
  case $e in
    docker | podman) "$e" import "$tar" "$name" ;;
    buildah)  # no import: a container from scratch with the tree added, committed
      c=$(buildah from scratch) && buildah add "$c" "$tar" / && buildah commit "$c" "$name" \
        && buildah rm "$c" ;;
  esac >/dev/null
  rm -f "$tar"
  echo "$name"
}

wheelhouse() {
  local flavor=$1 pip=("$PYTHON" -m pip)
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PYTHON is not Python 3.11, the images' Python: set PYTHON="
  mkdir -p "$WHEELS/common" "$WHEELS/torch-$flavor"
  # Each folder holds exactly what its requirement file pins (stale versions removed first).
  "${pip[@]}" download -q --no-deps --only-binary :all: -d "$WHEELS/torch-$flavor" \
    ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r "requirements/torch-$flavor.txt"
  "${pip[@]}" wheel -q --no-deps -w "$WHEELS/common" -r requirements/lock.txt
  prune "$WHEELS/torch-$flavor" "requirements/torch-$flavor.txt"
  prune "$WHEELS/common" requirements/lock.txt
  if [ "$flavor" = cpu ] && ls "$WHEELS/torch-cpu" | grep -q -E '^(nvidia|triton)|^torch-[^+]*-'; then
    die "$WHEELS/torch-cpu holds a CUDA build; set TORCH_INDEX to the PyTorch CPU wheel index"
  fi
  # A fixed timestamp makes the demix wheel reproducible: unchanged code, a cached image layer.
  rm -rf "$WHEELS/demix" && SOURCE_DATE_EPOCH=315532800 "${pip[@]}" wheel -q --no-deps \
    -w "$WHEELS/demix" .
  du -sh "$WHEELS/common" "$WHEELS/torch-$flavor" | sed 's/^/wheelhouse: /'
}

prune() {
  # Remove wheels whose NAME-VERSION is not pinned in the requirement file $2.
  local dir=$1 file=$2 wheel key
  for wheel in "$dir"/*.whl; do
    key=$(basename "$wheel" | cut -d- -f1-2 | tr '[:upper:]' '[:lower:]' | tr '_.' '--')
    if ! sed -n 's/^\([^#=]*\)===*\(.*\)$/\1-\2/p' "$file" | tr '[:upper:]' '[:lower:]' \
        | tr '_.' '--' | grep -qx -- "$key"; then
      rm -f "$wheel"
    fi
  done
}

build() {
  local flavor=$1 name=$2 e network=()
  e=$(engine)
  [ -d "$WHEELS/common" ] && [ -d "$WHEELS/torch-$flavor" ] && [ -d "$WHEELS/demix" ] \
    || die "no wheelhouse for $flavor: run 'make wheelhouse' first"
  # A local base needs nothing from outside: prove it by building without a network.
  case ${BASE:-} in localhost/*) network=(--network none) ;; esac
  [ "$e" = docker ] || sandbox_settings
  local started=$SECONDS
  # shellcheck disable=SC2086  # BUILD_FLAGS: extra flags for the engine's build, word-split
  "$e" build "${network[@]}" ${BUILD_FLAGS:-} -f images/Dockerfile --build-arg "FLAVOR=$flavor" \
    ${BASE:+--build-arg "BASE=$BASE"} -t "$name" .
  echo "built $name in $((SECONDS - started)) s with $e"
}

push() {
  local e; e=$(engine)
  [ "$e" = docker ] || sandbox_settings
  for name in "$@"; do "$e" push "$name"; done
}

run() {
  local e; e=$(engine)
  [ "$e" = buildah ] && e=podman
  [ "$e" = docker ] || sandbox_settings
  "$e" run "$@"
}

command=${1:-}; shift || true
case $command in
  engine) engine ;;
  tools) tools ;;
  base) base "$@" ;;
  wheelhouse) wheelhouse "$@" ;;
  build) build "$@" ;;
  push) push "$@" ;;
  run) run "$@" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
