#!/usr/bin/env bash
# Install covjax (with jax[tpu], and gcsfs for the gs:// workdir) on every worker of the TPU VM,
# from this checkout's HEAD (a source archive copied with scp) or from --git-url; with --stage,
# also copy gs:// objects (model, data) to ~/stage/ on every worker.
set -euo pipefail
SCRIPT_HELP="Install covjax on every worker of TPU_NAME (needs PROJECT, ZONE, TPU_NAME)."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require PROJECT ZONE TPU_NAME

if [[ -n $GIT_URL ]]; then
  fetch="rm -rf $REMOTE_REPO && git clone --quiet $(remote_quote "$GIT_URL") $REMOTE_REPO"
  fetch+=" && git -C $REMOTE_REPO checkout --quiet $(remote_quote "$GIT_REF")"
else
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    printf 'warning: uncommitted changes in %s are not shipped (HEAD is)\n' "$REPO_ROOT" >&2
  fi
  archive="${TMPDIR:-/tmp}/covjax-$TPU_NAME.tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=covjax/ --output="$archive" HEAD
  gcloud_tpus tpu-vm scp "$archive" "$TPU_NAME:covjax.tar.gz" --worker=all
  fetch="rm -rf $REMOTE_REPO && tar -xzf \$HOME/covjax.tar.gz -C \$HOME"
fi
# python3 -m pip installs into ~/.local on the TPU VM images (system site-packages are read-only).
tpu_ssh "$fetch && python3 -m pip install --quiet --upgrade pip \
&& python3 -m pip install --quiet \"${REMOTE_REPO}[tpu,gcs]\""

if [[ -n $STAGE ]]; then
  IFS=, read -r -a uris <<<"$STAGE"
  tpu_ssh "mkdir -p \$HOME/stage && gcloud storage cp --recursive $(remote_quote "${uris[@]}") \$HOME/stage/"
fi
