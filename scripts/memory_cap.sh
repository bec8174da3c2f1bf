#!/bin/bash
# Run a command under a memory cap, as if the machine had only that much RAM (Linux cgroup v1, as root):
#   bash scripts/memory_cap.sh 1000M python generate.py $MODEL_ARGS --bminf --bminf-memory-limit 0 ...
# The page cache is dropped first (pages cached before would be charged elsewhere), the command runs in a fresh
# memory cgroup whose limit covers RAM and swap, and the cgroup's peak usage and OOM-kill count are printed after it.
# Exit status: the command's.
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash scripts/memory_cap.sh LIMIT (e.g. 1000M, 2G) COMMAND [ARGS...]" >&2
    exit 2
fi
limit="$1"; shift
root=/sys/fs/cgroup/memory
if [ ! -w "${root}" ]; then
    echo "error: ${root} is not a writable cgroup v1 memory controller (run as root on a cgroup v1 machine)" >&2
    exit 2
fi
dir="${root}/glm-cap-$$"
mkdir "${dir}" || exit 2
cleanup() { rmdir "${dir}" 2>/dev/null; }
trap cleanup EXIT
echo "${limit}" > "${dir}/memory.limit_in_bytes" || exit 2
if [ -e "${dir}/memory.memsw.limit_in_bytes" ]; then
    echo "${limit}" > "${dir}/memory.memsw.limit_in_bytes" || exit 2  # no escape into swap
fi
sync
echo 3 > /proc/sys/vm/drop_caches
(echo "${BASHPID}" > "${dir}/cgroup.procs" && exec "$@")
status=$?
echo "> memory cap $(cat "${dir}/memory.limit_in_bytes") bytes: peak $(cat "${dir}/memory.max_usage_in_bytes") bytes" \
     "(page cache included), $(awk '$1 == "oom_kill" {print $2}' "${dir}/memory.oom_control") OOM kill(s)" >&2
exit "${status}"
