#!/usr/bin/env bash
# Fetch each worker's log of RUN_NAME into LOGS_DIR/RUN_NAME/WORKER.log (an scp from a TPU VM
# reaches one worker only, so the logs come back through one ssh to all workers), then the
# workdir's metrics, config and TensorBoard events from gs://BUCKET/RUN_NAME (not the
# checkpoints). With --tail=N, print the last N lines of each worker's log instead (each line
# prefixed with the worker's host name), e.g. while the job runs.
set -euo pipefail
SCRIPT_HELP="Fetch the logs of RUN_NAME (or CONFIG's name) from TPU_NAME and gs://BUCKET, or with
--tail=N show their last N lines (needs PROJECT, ZONE, TPU_NAME, BUCKET, RUN_NAME or CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME BUCKET RUN_NAME

if [[ -n $TAIL ]]; then
  # progress bars redraw with carriage returns: each redraw is a line here
  tpu_ssh "tr '\\r' '\\n' <$(job_file log) | tail -n $TAIL | sed \"s/^/\$(hostname): /\""
  exit 0
fi
dest="$LOGS_DIR/$RUN_NAME"
run mkdir -p "$dest/workdir"
tpu_ssh "cat $(job_file log)" --output-directory="$dest"
run gcloud storage rsync --recursive --exclude='^checkpoints/' "gs://$BUCKET/$RUN_NAME" \
  "$dest/workdir" --project="$PROJECT"
