#!/usr/bin/env bash
# The whole job: create, install, run, wait for the job to end (status.sh --wait), fetch logs,
# delete. Takes the options of all of them. The job runs detached on the workers: if this script
# stops while it waits, the job goes on (status.sh, logs.sh, stop.sh and delete.sh take over).
# A failed run keeps the TPU VM for inspection (delete.sh removes it), and so do workers that
# status.sh could not reach (exit 3); --keep always keeps it.
set -euo pipefail
SCRIPT_HELP="create.sh, install.sh, run.sh, status.sh --wait, logs.sh, then delete.sh (see each for
its settings)."
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"
parse_args "$@"

"$here/create.sh" "$@"
"$here/install.sh" "$@"
status=0
waited=0
"$here/run.sh" "$@" || status=$?
if [[ $status == 0 ]]; then
  waited=1
  "$here/status.sh" --wait "$@" || status=$?
fi
# a failed run's logs are fetched as far as they can be, and its message still follows
"$here/logs.sh" "$@" || ((status != 0))
if [[ $waited == 1 && $status == 3 ]]; then
  printf 'the workers did not answer, the job may still run; %s is kept: launch/tpu/status.sh\n' \
    "$TPU_NAME" >&2
  exit "$status"
elif [[ $status != 0 ]]; then
  printf 'the run failed (exit %s); %s is kept: launch/tpu/delete.sh deletes it\n' \
    "$status" "$TPU_NAME" >&2
  exit "$status"
fi
if [[ $KEEP == 0 ]]; then
  "$here/delete.sh" "$@"
fi
