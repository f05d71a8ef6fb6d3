#!/usr/bin/env bash
# Mount the bucket with gcsfuse on every worker (unless mounted already), then run
# `python -m covjax.train` on every worker at once (one JAX process per worker; the processes find
# each other through the TPU metadata) with the workdir MOUNT_POINT/RUN_NAME: one directory that
# all workers share, stored as gs://BUCKET/RUN_NAME. Blocks until training ends; each worker's
# output is also written to ~/covjax-logs/RUN_NAME.log there (fetch it with logs.sh).
set -euo pipefail
SCRIPT_HELP="Mount gs://BUCKET at MOUNT_POINT and train CONFIG on every worker of TPU_NAME, workdir
MOUNT_POINT/RUN_NAME (needs PROJECT, ZONE, TPU_NAME, BUCKET, CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME BUCKET CONFIG
if [[ ! -f $REPO_ROOT/${CONFIG%%:*} ]]; then
  die "--config=$CONFIG: no file ${CONFIG%%:*} in $REPO_ROOT (give it relative to the repository root)"
fi

mount_bucket
# MOUNT_POINT unquoted: $HOME expands on the workers (common.sh allows plain paths only).
train="$(remote_quote python3 -m covjax.train --config="$CONFIG")"
train+=" --workdir=$MOUNT_POINT/$(remote_quote "$RUN_NAME")"
if ((${#TRAIN_FLAGS[@]})); then
  train+=" $(remote_quote "${TRAIN_FLAGS[@]}")"
fi
# Keep-alives: a training run holds this ssh session for hours.
tpu_ssh "set -o pipefail && mkdir -p $REMOTE_LOGS && cd $REMOTE_REPO \
&& $train 2>&1 | tee $REMOTE_LOGS/$(remote_quote "$RUN_NAME").log" \
  --ssh-flag=-oServerAliveInterval=60
