#!/usr/bin/env bash
# Submit an isostack command to a Ray cluster as a Ray job (Ray Jobs API).
#
#   deploy/submit.sh [OPTIONS] [--] [run] [CONFIG|PRESET] --store URI [--set key=value]... [--run-id ID]
#   deploy/submit.sh [OPTIONS] [--] retrain|resume|evaluate|export|verify|status|gc RUN --store URI [...]
#
# It runs, from the repository root:
#   ray job submit --address ADDR --submission-id ID --working-dir . \
#       --runtime-env deploy/runtime_env.yaml -- sh deploy/job.sh run CONFIG --store URI ...
# (deploy/job.sh runs `python -m pipeline ...` with the interpreter the cluster's Ray runs, whatever the head's PATH).
# `ray` is the one on PATH, else this checkout's .venv/bin/ray, else $RAY_BIN: no venv needs to be activated.
# prints the job id, then follows the job's log until it ends and exits 0 only if it SUCCEEDED
# (with --no-wait it returns at once). Ctrl-C stops following; the job keeps running.
#
# Options (before the isostack arguments):
#   --address ADDR       the cluster: its dashboard (http://HEAD:8265) or GCS address (HEAD:6379).
#                        Default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, then http://127.0.0.1:8265.
#   --token-file FILE    the head's auth token (`ray get-auth-token` on the head); implies RAY_AUTH_MODE=token.
#                        Without it, a secured head is reached with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN,
#                        RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as every Ray client does.
#   --submission-id ID   the job id (default: isostack-<command>-<run id>-<unix time>).
#   --runtime-env FILE   default: deploy/runtime_env.yaml.
#   --no-wait            print the job id and return.
#   --dry-run            print the `ray job submit` command and exit.
#
# The job runs on the cluster, so the store must be a URI every node reaches (s3://, gs://) or an
# absolute path on a file system shared by every node; a relative path would land in the job's
# temporary working dir. A YAML config must lie inside the repository (it is uploaded with it).
set -euo pipefail

die() { echo "deploy/submit.sh: error: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY_BIN:-}" ]]; then
  if command -v ray >/dev/null; then RAY_BIN=ray
  elif [[ -x "$ROOT/.venv/bin/ray" ]]; then RAY_BIN="$ROOT/.venv/bin/ray"
  else RAY_BIN=ray
  fi
fi
ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}"
SUBMISSION_ID=""
RUNTIME_ENV="deploy/runtime_env.yaml"
WAIT=1
DRY_RUN=0
TOKEN_FILE=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) [[ $# -ge 2 ]] || die "--address needs a value"; ADDRESS="$2"; shift 2 ;;
    --address=*) ADDRESS="${1#*=}"; shift ;;
    --token-file) [[ $# -ge 2 ]] || die "--token-file needs a value"; TOKEN_FILE="$2"; shift 2 ;;
    --token-file=*) TOKEN_FILE="${1#*=}"; shift ;;
    --submission-id) [[ $# -ge 2 ]] || die "--submission-id needs a value"; SUBMISSION_ID="$2"; shift 2 ;;
    --submission-id=*) SUBMISSION_ID="${1#*=}"; shift ;;
    --runtime-env) [[ $# -ge 2 ]] || die "--runtime-env needs a value"; RUNTIME_ENV="$(realpath "$2")"; shift 2 ;;
    --runtime-env=*) RUNTIME_ENV="$(realpath "${1#*=}")"; shift ;;
    --no-wait) WAIT=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ -n "$TOKEN_FILE" ]]; then
  [[ -s "$TOKEN_FILE" ]] || die "--token-file $TOKEN_FILE is missing or empty"
  export RAY_AUTH_TOKEN_PATH="$(realpath "$TOKEN_FILE")" RAY_AUTH_MODE=token
  unset RAY_AUTH_TOKEN  # it would win over the file
fi

COMMAND=run
case "${1:-}" in
  run|resume|retrain|evaluate|export|verify|status|gc) COMMAND="$1"; shift ;;
esac
ARGS=("$@")

# ---- the store: a URI or an absolute (shared) path, never a relative one
STORE=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --store) STORE="${ARGS[i+1]:-}" ;;
    --store=*) STORE="${ARGS[i]#*=}" ;;
  esac
done
if [[ -z "$STORE" && -n "${ISOSTACK_STORE:-}" ]]; then
  STORE="$ISOSTACK_STORE"
  ARGS+=(--store "$STORE")
fi
if [[ -z "$STORE" ]]; then
  run_ref="${ARGS[0]:-}"
  if [[ "$COMMAND" == run || ( "$run_ref" != *://* && "$run_ref" != /* ) ]]; then
    die "pass --store URI (or set ISOSTACK_STORE): the job runs on the cluster, so the store must be a URI every node reaches (s3://bucket/runs, gs://bucket/runs) or an absolute path on a shared file system"
  fi
elif [[ "$STORE" != *://* && "$STORE" != /* ]]; then
  die "--store $STORE is a relative path; on the cluster it would point into the job's temporary working dir. Use s3://..., gs://... or an absolute path on a file system shared by every node"
fi

# ---- run: the config must travel with the working dir; pick the run id here so it can be printed
RUN_ID=""
if [[ "$COMMAND" == run ]]; then
  CONFIG=""
  if [[ ${#ARGS[@]} -gt 0 && "${ARGS[0]}" != -* ]]; then CONFIG="${ARGS[0]}"; fi
  if [[ "$CONFIG" == *.yaml || "$CONFIG" == *.yml ]]; then
    [[ -f "$CONFIG" ]] || die "config file $CONFIG does not exist"
    abs="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
    [[ "$abs" == "$ROOT"/* ]] || die "config $CONFIG lies outside $ROOT, which is what gets uploaded; copy it into the repository and pass that path"
    ARGS[0]="${abs#"$ROOT"/}"
  fi
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
      --run-id) RUN_ID="${ARGS[i+1]:-}" ;;
      --run-id=*) RUN_ID="${ARGS[i]#*=}" ;;
    esac
  done
  if [[ -z "$RUN_ID" ]]; then
    name="$(basename "${CONFIG:-norb-synthetic}")"; name="${name%.yaml}"; name="${name%.yml}"
    RUN_ID="${name}-$(date +%Y%m%d-%H%M%S)"
    ARGS+=(--run-id "$RUN_ID")
  fi
else
  [[ ${#ARGS[@]} -gt 0 ]] || die "isostack $COMMAND needs a RUN (a run id with --store, or the run's URI)"
  RUN_ID="$(basename "${ARGS[0]%%\?*}")"
fi

# ---- where to submit; token authentication as any Ray client does it
[[ -n "$ADDRESS" ]] || ADDRESS="http://127.0.0.1:8265"
# `ray job submit` prefers these variables to --address: make them name the same cluster.
export RAY_API_SERVER_ADDRESS="$ADDRESS"
unset RAY_ADDRESS
# Like Ray's own clients of a local cluster: a head on this machine gets this machine's token, if there is one.
if [[ -z "${RAY_AUTH_MODE:-}" && -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]] &&
   [[ "$ADDRESS" =~ ^(https?://)?(127\.0\.0\.1|localhost)(:|/|$) ]]; then
  export RAY_AUTH_MODE=token
fi
if [[ "${RAY_AUTH_MODE:-}" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  [[ -s "$token_file" ]] || die "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or put the head's token (\`ray get-auth-token\` on the head) in $token_file or a file named by --token-file / RAY_AUTH_TOKEN_PATH"
fi
[[ $DRY_RUN -eq 1 ]] || command -v "$RAY_BIN" >/dev/null || die "'$RAY_BIN' not found on PATH nor as $ROOT/.venv/bin/ray: run \`make run\` once (it creates .venv), install ray[default]==2.60.0, or set RAY_BIN=/path/to/ray"

SUBMISSION_ID="${SUBMISSION_ID:-isostack-${COMMAND}-${RUN_ID}-$(date +%s)}"
cd "$ROOT"
ENTRY=(sh deploy/job.sh "$COMMAND" "${ARGS[@]}")
submit=("$RAY_BIN" job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir .
        --runtime-env "$RUNTIME_ENV")
if [[ $DRY_RUN -eq 1 ]]; then
  printf '%q ' "${submit[@]}" -- "${ENTRY[@]}"; echo
  exit 0
fi
echo "isostack: job $SUBMISSION_ID -> $ADDRESS: isostack $COMMAND ${ARGS[*]}"
# The hints carry what this client needed to reach the cluster (address, token mode and file, never the token
# itself), so they work pasted into a fresh shell whether the head wants a token or not.
hint_env=""
if [[ "${RAY_AUTH_MODE:-}" == token ]]; then
  hint_env="RAY_AUTH_MODE=token "
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] || hint_env+="RAY_AUTH_TOKEN_PATH=$(printf '%q' "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}") "
fi
hint() { echo "${hint_env}$(printf '%q' "$RAY_BIN") job $1 $SUBMISSION_ID --address $(printf '%q' "$ADDRESS")"; }
echo "isostack: follow with: $(hint 'logs -f')"
echo "isostack: stop with:   $(hint stop)"
echo "isostack: list jobs:   ${hint_env}$(printf '%q' "$RAY_BIN") job list --address $(printf '%q' "$ADDRESS")"

# A head that has just started may answer "No available agent to submit job" until its job agent is up (seen
# within a minute of `ray start --head` on a busy machine): the job was not created, so the same submission is
# sent again, up to 6 times over about a minute. Any other failure is final.
[[ $WAIT -eq 1 ]] || submit+=(--no-wait)
answer="$(mktemp)"
trap 'rm -f "$answer"' EXIT
for attempt in 1 2 3 4 5 6; do
  set +e
  "${submit[@]}" -- "${ENTRY[@]}" 2>&1 | tee "$answer"
  rc=${PIPESTATUS[0]}
  set -e
  [[ $rc -ne 0 ]] && grep -q "No available agent to submit job" "$answer" && [[ $attempt -lt 6 ]] || break
  echo "isostack: the head's job agent is not up yet; submitting again in $((attempt * 4)) s (try $((attempt + 1)) of 6)" >&2
  sleep $((attempt * 4))
done
[[ $WAIT -eq 1 ]] || exit $rc
# With waiting, `ray job submit` streamed the job's log and exits 0 if the job SUCCEEDED, 1 if it FAILED or was STOPPED.
echo "isostack: job $SUBMISSION_ID $( [[ $rc -eq 0 ]] && echo SUCCEEDED || echo "did not succeed (exit $rc); see: $(hint logs)")"
exit $rc
