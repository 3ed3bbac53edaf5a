#!/bin/sh
# The entrypoint of every isostack Ray job: `sh deploy/job.sh COMMAND ARGS...` runs `python -m pipeline COMMAND ARGS...`
# with the Python interpreter the cluster itself runs, so it never depends on the head's PATH (a head started as
# `.venv/bin/ray start --head` has no `isostack` or venv `python` on its PATH, and the job's shell inherits that).
#
# Which interpreter, first found wins:
#   1. $ISOSTACK_PYTHON (set it in deploy/runtime_env.yaml's env_vars to force one);
#   2. the interpreter this node's raylet starts Ray workers with (the raylet is an ancestor of every job: its
#      `--python_worker_command=PYTHON setup_worker.py ...`): the interpreter Ray, torch and isostack live in;
#   3. python3 on PATH.
# The uploaded working dir is first on PYTHONPATH (Ray puts it there), so `-m pipeline` runs the submitted code.
set -eu

find_ray_python() {
  pid=$$
  while [ "$pid" -gt 1 ] 2>/dev/null; do
    py=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^--python_worker_command=\([^ ]*\).*/\1/p' | head -n 1)
    if [ -n "$py" ] && [ -x "$py" ]; then
      echo "$py"
      return 0
    fi
    pid=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f2)  # after "(comm) state": the parent
    [ -n "$pid" ] || return 1
  done
  return 1
}

py="${ISOSTACK_PYTHON:-}"
[ -n "$py" ] || py="$(find_ray_python || true)"
[ -n "$py" ] || py="$(command -v python3 || true)"
if [ -z "$py" ]; then
  echo "deploy/job.sh: error: no Python interpreter found for isostack on $(hostname): set ISOSTACK_PYTHON in deploy/runtime_env.yaml's env_vars to the interpreter that has isostack's dependencies" >&2
  exit 127
fi
exec "$py" -m pipeline "$@"
