#!/usr/bin/env bash
# Start a swtpm (TPM 2.0 simulator) on STATE_DIR and print its TCTI.
#
#   tpm/swtpm-start.sh STATE_DIR          Unix sockets: STATE_DIR/swtpm.sock, control channel
#                                         STATE_DIR/swtpm.sock.ctrl; prints swtpm:path=...
#                                         (for tpm2-tools / libtss2; NOT usable by the agent,
#                                         see below)
#   tpm/swtpm-start.sh STATE_DIR PORT     TCP on 127.0.0.1:PORT, control on PORT+1; prints
#                                         swtpm:host=127.0.0.1,port=PORT (what the agent uses)
#
# The swtpm TCTI of libtss2 3.2.1 derives the control socket from the server socket as
# "<path>.ctrl" and needs it at initialization (to set the locality): a control socket named
# anything else (e.g. STATE_DIR/swtpm.ctrl) makes Tss2_Tcti_Swtpm_Init fail with 0xa000a.
# nfv-warden uses tss-esapi 7.7, whose TctiNameConf drops path= (it would connect to
# localhost:2321 instead), so the agent refuses swtpm:path= and needs the TCP form.
#
# swtpm runs in the background (not --daemon, so STATE_DIR/swtpm.pid is the real PID) with
# its log in STATE_DIR/swtpm.log. Stop it with tpm/swtpm-stop.sh STATE_DIR.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 STATE_DIR [PORT]" >&2
    exit 2
fi
state_dir=$(realpath -m "$1")
port=${2:-}
mkdir -p "$state_dir/tpm"

if [[ -f "$state_dir/swtpm.pid" ]] && kill -0 "$(cat "$state_dir/swtpm.pid")" 2>/dev/null; then
    echo "swtpm already running for $state_dir (pid $(cat "$state_dir/swtpm.pid"))" >&2
    exit 1
fi

if [[ -n "$port" ]]; then
    server=(--server "type=tcp,port=$port,bindaddr=127.0.0.1")
    ctrl=(--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1")
    tcti="swtpm:host=127.0.0.1,port=$port"
else
    sock="$state_dir/swtpm.sock"
    rm -f "$sock" "$sock.ctrl"
    server=(--server "type=unixio,path=$sock")
    ctrl=(--ctrl "type=unixio,path=$sock.ctrl")
    tcti="swtpm:path=$sock"
fi

swtpm socket --tpm2 \
    --tpmstate "dir=$state_dir/tpm" \
    "${server[@]}" "${ctrl[@]}" \
    --flags not-need-init,startup-clear \
    </dev/null >>"$state_dir/swtpm.log" 2>&1 &
pid=$!
echo "$pid" >"$state_dir/swtpm.pid"

ready() {
    if [[ -n "$port" ]]; then
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    else
        [[ -S "$sock" && -S "$sock.ctrl" ]]
    fi
}

for _ in $(seq 1 500); do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "swtpm exited at start; see $state_dir/swtpm.log" >&2
        rm -f "$state_dir/swtpm.pid"
        exit 1
    fi
    if ready; then
        echo "$tcti"
        exit 0
    fi
    sleep 0.01
done
echo "swtpm did not become ready within 5 s; see $state_dir/swtpm.log" >&2
kill "$pid" 2>/dev/null || true
exit 1
