#!/usr/bin/env bash
# Create the TPU VM: directly, or with --queued through a queued resource, waiting until it is
# ACTIVE (capacity is granted when it frees up; see `gcloud compute tpus queued-resources`).
set -euo pipefail
SCRIPT_HELP="Create the TPU VM TPU_NAME (needs PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION

capacity=()
if [[ $SPOT == 1 ]]; then
  capacity=(--spot)
fi

if [[ $QUEUED == 0 ]]; then
  gcloud_tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"}
  exit 0
fi

gcloud_tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
  ${capacity[@]+"${capacity[@]}"}
if [[ $DRY_RUN == 1 ]]; then
  gcloud_tpus queued-resources describe "$TPU_NAME" --format='value(state.state)'
  exit 0
fi
while true; do
  state=$(gcloud_tpus queued-resources describe "$TPU_NAME" --format='value(state.state)')
  case $state in
    ACTIVE) break ;;
    FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state" ;;
  esac
  printf 'queued resource %s: %s; next check in %ss\n' "$TPU_NAME" "$state" "$POLL_SECONDS" >&2
  sleep "$POLL_SECONDS"
done
