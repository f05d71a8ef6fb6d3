#!/usr/bin/env bash
# Report RUN_NAME's job on every worker, one line each: running (and its pid), exited with its
# status (0: finished; 143: stopped by SIGTERM, after its checkpoint), or not running with no exit
# status (never started here, or killed with the VM). Exits 0 when every worker's job runs or
# finished with 0, else 1. With --wait, asks again every POLL_SECONDS until no worker's job runs.
set -euo pipefail
SCRIPT_HELP="Report whether RUN_NAME (or CONFIG's name) runs on every worker of TPU_NAME, or how it
ended; --wait: until it has ended everywhere (needs PROJECT, ZONE, TPU_NAME, RUN_NAME or CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME RUN_NAME

name=$(remote_quote "$RUN_NAME")
report="if $(job_running); then echo \"\$(hostname):\" $name \"is running (pid \$(cat $(job_file pid)))\"; \
elif [ -e $(job_file exit) ]; then s=\$(cat $(job_file exit)); \
echo \"\$(hostname):\" $name \"exited with status \$s\"; [ \"\$s\" = 0 ]; \
else echo \"\$(hostname):\" $name \"is not running and left no exit status\"; false; fi"

if [[ $WAIT == 0 || $DRY_RUN == 1 ]]; then
  tpu_ssh "$report"
  exit 0
fi
while true; do
  status=0
  lines=$(tpu_ssh "$report") || status=$?
  printf '%s\n' "$lines"
  if [[ $lines != *" is running ("* ]]; then
    exit $((status != 0))
  fi
  sleep "$POLL_SECONDS"
done
