#!/usr/bin/env bash
# Start `python -m covjax.train` on every worker at once (one JAX process per worker; the processes
# find each other through the TPU metadata) with the workdir gs://BUCKET/RUN_NAME, which every
# worker reads and writes directly. The job runs detached from the ssh session (setsid, nohup, no
# terminal): run.sh returns once it has started, and a dropped connection does not stop it. Each
# worker keeps its output in ~/covjax-logs/RUN_NAME.log (each start appends to it after a line
# with the date, so a resume keeps the previous run's end), the job's pid in RUN_NAME.pid, the
# worker's boot id in RUN_NAME.boot and, once it has ended, its exit status in RUN_NAME.exit:
# status.sh reports them, stop.sh stops the job, logs.sh fetches the logs. A worker where
# RUN_NAME's job still runs refuses to start another.
set -euo pipefail
SCRIPT_HELP="Start training CONFIG on every worker of TPU_NAME, detached, workdir gs://BUCKET/RUN_NAME
(needs PROJECT, ZONE, TPU_NAME, BUCKET, CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME BUCKET CONFIG
if [[ ! -f $REPO_ROOT/${CONFIG%%:*} ]]; then
  die "--config=$CONFIG: no file ${CONFIG%%:*} in $REPO_ROOT (give it relative to the repository root)"
fi

train="$(remote_quote python3 -m covjax.train --config="$CONFIG" --workdir="gs://$BUCKET/$RUN_NAME")"
if ((${#TRAIN_FLAGS[@]})); then
  train+=" $(remote_quote "${TRAIN_FLAGS[@]}")"
fi
# The job's shell: writes the boot id and its pid, appends a start line and the training's output
# to the log, then writes the exit status (whole, by a rename). $$ and $? are its own. The start
# waits (up to 10 s) for the pid, so that status.sh right after it finds the job.
job="cat $BOOT_ID >$(job_file boot) && echo \$\$ >$(job_file pid) \
&& { echo \"=== \$(date -u +%FT%TZ): start of\" $(remote_quote "$RUN_NAME") \"===\" \
&& cd $REMOTE_REPO && $train; } >>$(job_file log) 2>&1 </dev/null; \
echo \$? >$(job_file exit.partial) && mv $(job_file exit.partial) $(job_file exit)"
tpu_ssh "mkdir -p $REMOTE_LOGS && if $(job_running); then \
echo \"\$(hostname):\" $(remote_quote "$RUN_NAME") \"is running already (pid \$(cat $(job_file pid))); \
launch/tpu/stop.sh stops it\" >&2; exit 1; fi \
&& rm -f $(job_file pid) $(job_file boot) $(job_file exit) \
&& { nohup setsid bash -c $(remote_quote "$job") >/dev/null 2>&1 </dev/null & } \
&& for _ in \$(seq 100); do [ -e $(job_file pid) ] && break; sleep 0.1; done \
&& [ -e $(job_file pid) ] && echo \"\$(hostname): started\" $(remote_quote "$RUN_NAME") \"(pid \$(cat $(job_file pid)))\""
