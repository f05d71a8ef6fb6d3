#!/usr/bin/env bash
# Delete the TPU VM (with --queued: its queued resource, which deletes the VM too).
set -euo pipefail
SCRIPT_HELP="Delete the TPU VM TPU_NAME (needs PROJECT, ZONE, TPU_NAME)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME

if [[ $QUEUED == 1 ]]; then
  gcloud_tpus queued-resources delete "$TPU_NAME" --force
else
  gcloud_tpus tpu-vm delete "$TPU_NAME"
fi
