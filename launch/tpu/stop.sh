#!/usr/bin/env bash
# Stop RUN_NAME's job on every worker: SIGTERM to the training process, which saves a checkpoint
# and exits with status 143 (status.sh shows when it has); run.sh with the same settings resumes.
set -euo pipefail
SCRIPT_HELP="Stop RUN_NAME (or CONFIG's name) on every worker of TPU_NAME, after its checkpoint
(needs PROJECT, ZONE, TPU_NAME, RUN_NAME or CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME RUN_NAME

# The job's shell runs the trainer as its one child: pkill -P signals that child alone.
name=$(remote_quote "$RUN_NAME")
tpu_ssh "if $(job_running); then pkill -TERM -P \$(cat $(job_file pid)) \
&& echo \"\$(hostname): sent SIGTERM to\" $name; \
else echo \"\$(hostname):\" $name \"is not running\"; fi"
