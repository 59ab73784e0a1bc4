#!/usr/bin/env bash
# Run an m1jax command on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh [options] ACTION...     ACTION: create | setup | run | logs | delete | all
#
#   --name NAME            TPU VM name (default m1jax-$USER)
#   --zone ZONE            e.g. us-east5-a (default $TPU_ZONE)
#   --project PROJECT      default: gcloud's configured project
#   --type TYPE            accelerator type, e.g. v5p-128 (default v5p-8)
#   --version VERSION      TPU runtime, e.g. v2-alpha-tpuv5 (default for v5p)
#   --queued               create through a queued resource (waits for capacity) instead of directly
#   --spot                 spot capacity
#   --command CMD          what `run` runs on every worker, from the repository root
#                          (default: python -m experiments.pretrain --config configs/pretrain_m1_full.py)
#   --workdir DIR          --workdir for the command; use a gs:// bucket so every host sees it
#   --dry-run              print the gcloud commands instead of running them
#
# `all` = create, setup, run, logs, delete. `setup` copies this repository to every worker and installs
# it with the TPU extra; `run` starts the same command on all workers (jax.distributed reads the TPU
# metadata, see m1jax/distributed.py) in the background under nohup, `logs` gathers each worker's log
# into ./logs/NAME/, `delete` tears the slice down.
set -euo pipefail

NAME="m1jax-${USER:-user}"
ZONE="${TPU_ZONE:-}"
PROJECT=""
TYPE="v5p-8"
VERSION=""
QUEUED=0
SPOT=0
CMD="python -m experiments.pretrain --config configs/pretrain_m1_full.py"
WORKDIR=""
DRY=0
ACTIONS=()

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --command) CMD="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    create|setup|run|logs|delete) ACTIONS+=("$1"); shift ;;
    all) ACTIONS+=(create setup run logs delete); shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[[ ${#ACTIONS[@]} -gt 0 ]] || die "no action given (create | setup | run | logs | delete | all)"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default runtime for --type $TYPE; pass --version" ;;
  esac
fi
[[ -n "$WORKDIR" ]] && CMD="$CMD --workdir $WORKDIR"

GC=(gcloud compute tpus)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")
REPO="$(cd "$(dirname "$0")/.." && pwd)"

run() {  # print, and execute unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ $DRY -eq 1 ]] || "$@"
}

create() {
  local extra=()
  [[ $SPOT -eq 1 ]] && extra+=(--spot)
  if [[ $QUEUED -eq 1 ]]; then
    run "${GC[@]}" queued-resources create "$NAME" "${COMMON[@]}" --node-id "$NAME" \
      --accelerator-type "$TYPE" --runtime-version "$VERSION" "${extra[@]}"
    # wait until the slice is ACTIVE (queued resources may take a while)
    if [[ $DRY -eq 0 ]]; then
      until [[ "$("${GC[@]}" queued-resources describe "$NAME" "${COMMON[@]}" --format='value(state.state)')" == ACTIVE ]]; do
        sleep 30
      done
    else
      echo "# (waits until: ${GC[*]} queued-resources describe $NAME --format='value(state.state)' == ACTIVE)"
    fi
  else
    run "${GC[@]}" tpu-vm create "$NAME" "${COMMON[@]}" --accelerator-type "$TYPE" --version "$VERSION" "${extra[@]}"
  fi
}

ssh_all() { run "${GC[@]}" tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command "$1"; }

setup() {
  run tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs --exclude=logs -czf /tmp/m1jax.tgz .
  run "${GC[@]}" tpu-vm scp /tmp/m1jax.tgz "$NAME:~/m1jax.tgz" "${COMMON[@]}" --worker=all
  ssh_all "mkdir -p ~/m1jax && tar -C ~/m1jax -xzf ~/m1jax.tgz && cd ~/m1jax && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'"
}

run_cmd() {
  ssh_all "cd ~/m1jax && nohup $CMD > ~/m1jax.log 2>&1 &"
}

logs() {
  local n
  n="$(case "$TYPE" in *-*) echo "${TYPE##*-}" ;; esac)"
  run mkdir -p "logs/$NAME"
  # one host per 4 chips (v5p / v4: the type counts TensorCores, 2 per chip -> 8 per host)
  local hosts=$(( n >= 8 ? n / 8 : 1 ))
  [[ "$TYPE" == v5litepod-* || "$TYPE" == v6e-* ]] && hosts=$(( n >= 4 ? n / 4 : 1 ))
  for (( w = 0; w < hosts; w++ )); do
    run "${GC[@]}" tpu-vm scp "$NAME:~/m1jax.log" "logs/$NAME/worker$w.log" "${COMMON[@]}" --worker="$w"
  done
}

delete() {
  if [[ $QUEUED -eq 1 ]]; then
    run "${GC[@]}" queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
  else
    run "${GC[@]}" tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
  fi
}

for a in "${ACTIONS[@]}"; do
  case "$a" in
    run) run_cmd ;;
    *) "$a" ;;
  esac
done
