#!/usr/bin/env bash
# Fetch each worker's log of RUN_NAME into LOGS_DIR/RUN_NAME/WORKER.log (an scp from a TPU VM
# reaches one worker only, so the logs come back through one ssh to all workers), then the
# workdir's metrics, config and TensorBoard events from gs://BUCKET/RUN_NAME (not the checkpoints):
# the objects the workers wrote through their gcsfuse mount at MOUNT_POINT/RUN_NAME.
set -euo pipefail
SCRIPT_HELP="Fetch the logs of RUN_NAME (or CONFIG's name) from TPU_NAME and gs://BUCKET
(needs PROJECT, ZONE, TPU_NAME, BUCKET, RUN_NAME or CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME BUCKET RUN_NAME

dest="$LOGS_DIR/$RUN_NAME"
run mkdir -p "$dest/workdir"
tpu_ssh "cat $REMOTE_LOGS/$(remote_quote "$RUN_NAME").log" --output-directory="$dest"
run gcloud storage rsync --recursive --exclude='^checkpoints/' "gs://$BUCKET/$RUN_NAME" \
  "$dest/workdir" --project="$PROJECT"
