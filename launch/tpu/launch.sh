#!/usr/bin/env bash
# The whole job: create, install, run, fetch logs, delete. Takes the options of all of them.
# A failed run keeps the TPU VM for inspection (delete.sh removes it); --keep always keeps it.
set -euo pipefail
SCRIPT_HELP="create.sh, install.sh, run.sh, logs.sh, then delete.sh (see each for its settings)."
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"
parse_args "$@"

"$here/create.sh" "$@"
"$here/install.sh" "$@"
status=0
"$here/run.sh" "$@" || status=$?
"$here/logs.sh" "$@"
if [[ $status != 0 ]]; then
  printf 'run.sh failed (exit %s); %s is kept: launch/tpu/delete.sh deletes it\n' \
    "$status" "$TPU_NAME" >&2
  exit "$status"
fi
if [[ $KEEP == 0 ]]; then
  "$here/delete.sh" "$@"
fi
