#!/usr/bin/env bash
# `make test-images`: build the CPU image on the local Debian base (or BASE=) and check it from
# inside, as its non-root user with no network: the user, writable working folders, no CUDA
# libraries, no credentials, `demix --help`, and every component's python_func on tiny
# artifacts (pytest on tests/ mounted read-only), training included.
#
#   images/test-images.sh IMAGE
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:?usage: images/test-images.sh IMAGE}
SH=images/images.sh
started=$SECONDS
step() { printf '\n== %s (%d s)\n' "$*" $((SECONDS - started)); }
fail() { echo "test-images: FAILED: $*" >&2; exit 1; }

step "tools"
if [ -z "${ENGINE:-}" ] && ! { command -v docker >/dev/null && docker info >/dev/null 2>&1; }; then
  $SH tools
  export ENGINE=podman
fi
export BASE=${BASE:-localhost/demix-base:bookworm}
echo "engine: $($SH engine), base: $BASE"

step "base image"
if [ "$BASE" = localhost/demix-base:bookworm ] && ! $SH run --rm --pull never --network none \
    --entrypoint true "$BASE" 2>/dev/null; then
  $SH base "$BASE"
fi

step "wheelhouse"
$SH wheelhouse cpu
step "build"
$SH build cpu "$IMAGE"

run() { $SH run --rm --network none "$@"; }

# One container for the checks below: with the vfs store each container start copies the image.
step "user, working folders, no CUDA libraries, no credentials, demix --help"
run --entrypoint sh "$IMAGE" -ec '
  uid=$(id -u)
  [ "$uid" = 1000 ] || { echo "the image runs as uid $uid, not 1000 (demix)"; exit 1; }
  for d in "$HOME" /tmp /gcs /minio /s3 "$PWD"; do
    touch "$d/.w" && rm "$d/.w" || { echo "not writable: $d"; exit 1; }; done
  ! touch /opt/venv/.w 2>/dev/null || { echo "/opt/venv is writable by the user"; exit 1; }
  echo "uid $uid ($(id -un)), home $HOME: working folders writable, /opt/venv not"

  bad=$(pip list --format=freeze | grep -i -E "^(nvidia-|triton)" || true)
  [ -z "$bad" ] || { echo "CUDA packages: $bad"; exit 1; }
  libs=$(find / -xdev \( -name "libcudart*" -o -name "libcudnn*" -o -name "libnccl*" \) \
         2>/dev/null || true)
  [ -z "$libs" ] || { echo "CUDA libraries: $libs"; exit 1; }
  python -c "import torch; assert torch.version.cuda is None, torch.version.cuda; \
             print(\"torch\", torch.__version__, \"CPU build, no nvidia-* package, no libcudart\")"

  for p in /root /home/demix; do
    for c in .config/gcloud .aws .docker/config.json .netrc .git-credentials .kube; do
      [ ! -e "$p/$c" ] || { echo "credentials in the image: $p/$c"; exit 1; }; done; done
  keys=$(find / -xdev -name "*.json" -size -64k 2>/dev/null \
         | xargs -r grep -l -E "\"(private_key|client_secret|refresh_token)\"" || true)
  [ -z "$keys" ] || { echo "key files: $keys"; exit 1; }
  names=$(env | cut -d= -f1 \
          | grep -i -E "(^|_)(token|secret|password|credentials?|api_?key)(_|$)" || true)
  [ -z "$names" ] || { echo "credential-like variables: $names"; exit 1; }
  echo "no gcloud/aws/docker/kube config, no JSON keys, no credential variables"

  demix --help | head -3
  echo "image size: $(du -sh -x / 2>/dev/null | cut -f1)"
' || fail "the checks inside $IMAGE"

step "every component's python_func (pytest inside the image)"
# pytest is not in the image: a copy beside it, mounted read-only with the tests (what it
# shares with the image held at the lock's versions).
site=build/image-test/site
if [ ! -d "$site/pytest" ]; then
  pytest_pin=$(grep -o '"pytest==[^"]*"' pyproject.toml | tr -d '"')
  ${PYTHON:-python3} -m pip install -q --target "$site" -c requirements/lock.txt "$pytest_pin"
fi
run -v "$PWD:/src:ro" -v "$PWD/$site:/opt/test-site:ro" -w /src \
  -e PYTHONPATH=/src:/opt/test-site -e PYTHONDONTWRITEBYTECODE=1 \
  --entrypoint python "$IMAGE" -m pytest -p no:cacheprovider -q -m "not gpu" \
  tests/test_components_chain.py tests/test_export.py \
  tests/test_pipeline.py::test_components_python_func_on_tiny_artifacts \
  tests/test_pipeline.py::test_training_components_log_loss_tokens_and_throughput \
  tests/test_pipeline.py::test_resolve_config_refuses_bad_overrides

echo "test-images: passed in $((SECONDS - started)) s"
