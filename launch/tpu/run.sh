#!/usr/bin/env bash
# Run `python -m covjax.train` on every worker at once (one JAX process per worker; the processes
# find each other through the TPU metadata). Blocks until training ends; each worker's output is
# also written to ~/covjax-logs/RUN_NAME.log there (fetch it with logs.sh).
set -euo pipefail
SCRIPT_HELP="Train CONFIG on every worker of TPU_NAME, workdir gs://BUCKET/RUN_NAME
(needs PROJECT, ZONE, TPU_NAME, BUCKET, CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME BUCKET CONFIG
if [[ ! -f $REPO_ROOT/${CONFIG%%:*} ]]; then
  die "--config=$CONFIG: no file ${CONFIG%%:*} in $REPO_ROOT (give it relative to the repository root)"
fi

train=(python3 -m covjax.train --config="$CONFIG" --workdir="gs://$BUCKET/$RUN_NAME")
train+=(${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"})
# Keep-alives: a training run holds this ssh session for hours.
tpu_ssh "set -o pipefail && mkdir -p $REMOTE_LOGS && cd $REMOTE_REPO \
&& $(remote_quote "${train[@]}") 2>&1 | tee $REMOTE_LOGS/$(remote_quote "$RUN_NAME").log" \
  --ssh-flag=-oServerAliveInterval=60
