#!/usr/bin/env bash
# Stop the swtpm started by tpm/swtpm-start.sh STATE_DIR: SIGTERM to the PID in
# STATE_DIR/swtpm.pid, wait for it to exit (SIGKILL after 5 s). Never by process name.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
state_dir=$(realpath -m "$1")
pid_file="$state_dir/swtpm.pid"
if [[ ! -f "$pid_file" ]]; then
    echo "no $pid_file: swtpm not started by swtpm-start.sh?" >&2
    exit 1
fi
pid=$(cat "$pid_file")
if [[ ! "$pid" =~ ^[0-9]+$ ]]; then
    echo "$pid_file does not hold a PID" >&2
    exit 1
fi
# Only signal the PID if it still is a swtpm (the PID may have been reused).
if kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == swtpm* ]]; then
    kill -TERM "$pid"
    for _ in $(seq 1 500); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.01
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "swtpm $pid ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
fi
rm -f "$pid_file" "$state_dir/swtpm.sock" "$state_dir/swtpm.sock.ctrl"
