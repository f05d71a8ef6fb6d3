#!/usr/bin/env bash
# Report RUN_NAME's job on every worker, one line each: running (and its pid), exited with its
# status (0: finished; 143: stopped by SIGTERM, after its checkpoint), or not running with no exit
# status (never started here, or killed with the VM). Exits 0 when every worker's job runs or
# finished with 0, else 1. With --wait, asks again every POLL_SECONDS until no worker's job runs.
# Every worker's report succeeds, so a failed ssh (gcloud's non-zero exit, or no report at all) is
# the connection's failure, not the job's: it is asked again up to STATUS_RETRIES times,
# POLL_SECONDS apart, then status.sh exits 3 (the job may still run).
set -euo pipefail
SCRIPT_HELP="Report whether RUN_NAME (or CONFIG's name) runs on every worker of TPU_NAME, or how it
ended; --wait: until it has ended everywhere (needs PROJECT, ZONE, TPU_NAME, RUN_NAME or CONFIG)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME RUN_NAME

host_name="echo \"\$(hostname):\" $(remote_quote "$RUN_NAME")"
report="if $(job_running); then $host_name \"is running (pid \$(cat $(job_file pid)))\"; \
elif [ -e $(job_file exit) ]; then $host_name \"exited with status \$(cat $(job_file exit))\"; \
else $host_name \"is not running and left no exit status\"; fi"

if [[ $DRY_RUN == 1 ]]; then
  tpu_ssh "$report"
  exit 0
fi

# ask_workers : every worker's report line into $lines, retrying a failed ssh; exits 3 when every
# try failed.
ask_workers() {
  local try
  for ((try = 1; ; try++)); do
    if lines=$(tpu_ssh "$report") && [[ -n $lines ]]; then
      return 0
    fi
    if ((try > STATUS_RETRIES)); then
      printf '%s: error: could not reach the workers of %s (%s tries); %s may still run there\n' \
        "$(basename "$0")" "$TPU_NAME" "$try" "$RUN_NAME" >&2
      exit 3
    fi
    printf 'could not reach the workers of %s; asking again in %ss (retry %s of %s)\n' \
      "$TPU_NAME" "$POLL_SECONDS" "$try" "$STATUS_RETRIES" >&2
    sleep "$POLL_SECONDS"
  done
}

while true; do
  ask_workers
  printf '%s\n' "$lines"
  if [[ $WAIT == 0 || $lines != *" is running ("* ]]; then
    break
  fi
  sleep "$POLL_SECONDS"
done
good=' (is running \(pid [0-9]+\)|exited with status 0)$'
while IFS= read -r line; do
  [[ $line =~ $good ]] || exit 1
done <<<"$lines"
