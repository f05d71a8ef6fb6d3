# shellcheck shell=bash disable=SC2034  # the settings below are read by the sourcing scripts
# Sourced by every launch/tpu script: settings, option parsing, and the one function that runs a
# command or, with --dry-run, prints it. Settings come from the environment and are overridden by
# --flag=value options of the same name (TPU_NAME <-> --tpu-name=...).

LAUNCH_TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_TPU_DIR/../.." && pwd)

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
BUCKET=${BUCKET:-}
CONFIG=${CONFIG:-}
RUN_NAME=${RUN_NAME:-}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-main}
STAGE=${STAGE:-}
LOGS_DIR=${LOGS_DIR:-logs}
QUEUED=${QUEUED:-0}
SPOT=${SPOT:-0}
KEEP=${KEEP:-0}
DRY_RUN=${DRY_RUN:-0}
WAIT=${WAIT:-0}
TAIL=${TAIL:-}
POLL_SECONDS=${POLL_SECONDS:-30}
STATUS_RETRIES=${STATUS_RETRIES:-5}
TRAIN_FLAGS=()

# Where covjax lives on every worker, and where each worker keeps a job's files (job_file);
# $HOME is expanded by the workers' shell.
# shellcheck disable=SC2016
REMOTE_REPO='$HOME/covjax'
# shellcheck disable=SC2016
REMOTE_LOGS='$HOME/covjax-logs'

die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

usage() {
  cat <<EOF
usage: $(basename "$0") [--flag=value ...] [--dry-run] [-- TRAIN_FLAGS...]
$SCRIPT_HELP

Settings (flag or environment variable):
  --project=ID            PROJECT           Google Cloud project
  --zone=ZONE             ZONE              e.g. us-east5-a (v5p), us-central2-b (v4)
  --tpu-name=NAME         TPU_NAME          TPU VM (and queued resource) name
  --accelerator-type=T    ACCELERATOR_TYPE  e.g. v5p-64 (32 chips), v5litepod-16, v4-32
  --runtime-version=V     RUNTIME_VERSION   TPU software version (default from the accelerator)
  --bucket=NAME           BUCKET            gs:// bucket for the workdir (checkpoints, metrics)
  --config=FILE           CONFIG            config file relative to the repository root
  --run-name=NAME         RUN_NAME          the job's name and workdir gs://BUCKET/RUN_NAME
                                            (default: config's name)
  --git-url=URL           GIT_URL           install from this git repository instead of HEAD here
  --git-ref=REF           GIT_REF           branch, tag or commit of --git-url (default main)
  --stage=URI[,URI...]    STAGE             gs:// objects copied to ~/stage/ on every worker
  --logs-dir=DIR          LOGS_DIR          local folder for fetched logs (default logs)
  --queued                QUEUED=1          create through a queued resource (waits for capacity)
  --spot                  SPOT=1            spot (preemptible) capacity
  --keep                  KEEP=1            launch.sh: do not delete the TPU VM at the end
  --wait                  WAIT=1            status.sh: ask every POLL_SECONDS (default 30)
                                            until the job has ended on every worker; an ssh
                                            that fails is retried STATUS_RETRIES times
                                            (default 5), POLL_SECONDS apart
  --tail=N                TAIL              logs.sh: print each worker's last N log lines
  --dry-run               DRY_RUN=1         print every command instead of running it
  -- TRAIN_FLAGS...                         run.sh: extra flags for python -m covjax.train
EOF
}

parse_args() {
  while (($#)); do
    case $1 in
      --project=*) PROJECT=${1#*=} ;;
      --zone=*) ZONE=${1#*=} ;;
      --tpu-name=*) TPU_NAME=${1#*=} ;;
      --accelerator-type=*) ACCELERATOR_TYPE=${1#*=} ;;
      --runtime-version=*) RUNTIME_VERSION=${1#*=} ;;
      --bucket=*) BUCKET=${1#*=} ;;
      --config=*) CONFIG=${1#*=} ;;
      --run-name=*) RUN_NAME=${1#*=} ;;
      --git-url=*) GIT_URL=${1#*=} ;;
      --git-ref=*) GIT_REF=${1#*=} ;;
      --stage=*) STAGE=${1#*=} ;;
      --logs-dir=*) LOGS_DIR=${1#*=} ;;
      --queued) QUEUED=1 ;;
      --spot) SPOT=1 ;;
      --keep) KEEP=1 ;;
      --wait) WAIT=1 ;;
      --tail=*) TAIL=${1#*=} ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        TRAIN_FLAGS=("$@")
        break
        ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  if [[ -n $TAIL && ! $TAIL =~ ^[1-9][0-9]*$ ]]; then
    die "--tail=$TAIL: give a number of lines (1 or more)"
  fi
  if [[ ! $STATUS_RETRIES =~ ^[0-9]+$ ]]; then
    die "STATUS_RETRIES=$STATUS_RETRIES: give a number of retries (0 or more)"
  fi
  if [[ -z $RUN_NAME && -n $CONFIG ]]; then
    RUN_NAME=$(basename "${CONFIG%%:*}" .py)
  fi
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")
  fi
}

# The TPU VM base image for each generation (cloud.google.com/tpu/docs/runtimes).
default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) echo "" ;;
  esac
}

# require VAR... : stop naming the flag and variable of each setting that is empty.
require() {
  local var flag
  for var in "$@"; do
    if [[ -z ${!var} ]]; then
      flag=$(printf '%s' "$var" | tr '[:upper:]_' '[:lower:]-')
      die "missing --$flag=... (or environment variable $var)"
    fi
  done
}

# Print a command as one line a shell can paste back: arguments with special characters quoted.
print_command() {
  local arg line=''
  local quote="'" escaped_quote="'\\''"
  for arg in "$@"; do
    if [[ ! $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      arg="'${arg//$quote/$escaped_quote}'"
    fi
    line+="${line:+ }$arg"
  done
  printf '%s\n' "$line"
}

# run CMD... : print it (--dry-run) or echo it to stderr and run it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    print_command "$@"
  else
    printf '+ %s\n' "$(print_command "$@")" >&2
    "$@"
  fi
}

# gcloud compute tpus SUBCOMMAND... with this run's project and zone, never prompting.
gcloud_tpus() {
  run gcloud compute tpus "$@" --project="$PROJECT" --zone="$ZONE" --quiet
}

# tpu_ssh COMMAND [FLAGS...] : run a shell command on every worker of the TPU VM at once.
tpu_ssh() {
  local command=$1
  shift
  gcloud_tpus tpu-vm ssh "$TPU_NAME" --worker=all --command="$command" "$@"
}

# job_file EXT : a file of RUN_NAME's job on every worker, as the workers' shell reads it: .log
# (its output), .pid (the shell that runs it), .boot (the boot id of the worker when it started),
# .exit (its exit status, once it has ended).
job_file() {
  printf '%s/%s.%s' "$REMOTE_LOGS" "$(remote_quote "$RUN_NAME")" "$1"
}

# The worker's boot id, which changes on every boot.
BOOT_ID=/proc/sys/kernel/random/boot_id

# A test, in the workers' shell, that RUN_NAME's job is running there: its shell, started since
# the worker last booted (after a reboot the pid may name another process), is alive and has not
# yet written the exit status.
# shellcheck disable=SC2016  # $(cat ...) is expanded by the workers' shell
job_running() {
  printf '[ -e %s ] && [ ! -e %s ] && [ "$(cat %s 2>/dev/null)" = "$(cat %s)" ]' \
    "$(job_file pid)" "$(job_file exit)" "$(job_file boot)" "$BOOT_ID"
  printf ' && kill -0 "$(cat %s)" 2>/dev/null' "$(job_file pid)"
}

# The arguments quoted for the workers' shell (bash on the TPU VM images), space-separated.
remote_quote() {
  local quoted
  printf -v quoted '%q ' "$@"
  printf '%s' "${quoted% }"
}
