#!/usr/bin/env bash
# cluster/local_cluster.sh: a multi-node Ray cluster on this machine (every node on 127.0.0.1), to try the
# `ray job submit` path of a real cluster without one: a head node (no CPUs for actors, so every actor lands on a
# worker node, as on a real cluster) and N worker nodes, each a separate `ray start --block` process.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus-per-worker C] [--gpus-per-worker G]
#                                  [--port P] [--dashboard-port D]
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop
#
# `stop` stops only the processes `start` recorded (their PIDs are in $RLHF_CLUSTER_DIR/pids); it never runs a
# global `ray stop`, so other Ray instances on the machine (a test suite's, a colleague's) are left alone.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${RLHF_CLUSTER_DIR:-/tmp/rlhfd-cluster-$(id -u)}"   # short: Ray's socket paths live under it
PID_FILE="$STATE_DIR/pids"

usage() {
    cat <<EOF
Usage: $(basename "$0") start [options] | status | stop | --help

Starts a Ray cluster of one head and N worker nodes on 127.0.0.1 (separate 'ray start --block' processes),
prints the 'ray job submit' command for configs/tiny.yaml, and stops exactly what it started.

Commands:
  start     start the head and the worker nodes, wait until all have joined, print how to submit
  status    show which recorded processes are alive and the cluster's 'ray status'
  stop      stop the recorded processes (SIGTERM to each process group, SIGKILL after 45 s)

Options for start:
  --workers N            worker nodes (default 2)
  --cpus-per-worker C    logical CPUs per worker node (default 2; configs/tiny.yaml needs 2 in all)
  --gpus-per-worker G    GPUs per worker node (default 0)
  --port P               GCS port of the head (default 6379)
  --dashboard-port D     dashboard / job server port (default 8265)

Environment:
  RAY                the ray executable (default: 'ray' on PATH, else $REPO_ROOT/.venv/bin/ray); its
                     directory is put first on PATH, so the job's 'python' is the one next to it
  RLHF_CLUSTER_DIR   where the PID file, logs and Ray's temp dir go (default /tmp/rlhfd-cluster-\$UID)
EOF
}

die() { echo "error: $*" >&2; exit 2; }

FREE_PORT='
import socket
with socket.socket() as s:
    s.bind(("", 0))
    print(s.getsockname()[1])
'

HTTP_ANSWERS='
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
'


find_ray() {
    if [[ -n "${RAY:-}" ]]; then
        echo "$RAY"
    elif command -v ray >/dev/null 2>&1; then
        command -v ray
    elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
        echo "$REPO_ROOT/.venv/bin/ray"
    else
        die "no 'ray' executable: install the package (pip install -e .) or set RAY=/path/to/ray"
    fi
}

port_in_use() {  # true when something accepts connections on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# PIDs recorded by `start` that are still our `ray start` processes (guards against PID reuse).
alive_recorded() {
    [[ -f "$PID_FILE" ]] || return 0
    local name pid
    while read -r name pid; do
        [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || continue
        if [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"ray start --block"* ]]; then
            echo "$name $pid"
        fi
    done <"$PID_FILE"
}

start_node() {  # start_node NAME LOG ARGS...: one `ray start --block` in its own session, PID recorded
    local name="$1" log="$2" agent_port
    shift 2
    # Several nodes share this host: each gets its own dashboard-agent port (Ray's fixed default, 52365, would be
    # taken by the first node or by another Ray instance here) and OS-chosen worker ports.
    agent_port="$("$PYTHON" -c "$FREE_PORT")"
    setsid "$RAY_BIN" start --block "$@" --dashboard-agent-listen-port "$agent_port" \
        --min-worker-port 0 --max-worker-port 0 >"$log" 2>&1 </dev/null &
    echo "$name $!" >>"$PID_FILE"
}

wait_started() {  # wait_started NAME LOG: until `ray start` logs success; false if it exits or takes 120 s
    local name="$1" log="$2" deadline=$((SECONDS + 120))
    until grep -q "Ray runtime started" "$log" 2>/dev/null; do
        if ! grep -q "^$name " <<<"$(alive_recorded)" || ((SECONDS > deadline)); then
            return 1
        fi
        sleep 1
    done
}

cmd_start() {
    local workers=2 cpus=2 gpus=0 port=6379 dashboard_port=8265
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --workers) workers="${2:?--workers needs a value}"; shift 2 ;;
            --cpus-per-worker) cpus="${2:?--cpus-per-worker needs a value}"; shift 2 ;;
            --gpus-per-worker) gpus="${2:?--gpus-per-worker needs a value}"; shift 2 ;;
            --port) port="${2:?--port needs a value}"; shift 2 ;;
            --dashboard-port) dashboard_port="${2:?--dashboard-port needs a value}"; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option for start: $1 (see --help)" ;;
        esac
    done
    [[ "$workers" =~ ^[0-9]+$ && "$workers" -ge 1 ]] || die "--workers must be a whole number >= 1 (got $workers)"
    if [[ -n "$(alive_recorded)" ]]; then
        die "a cluster started by this script is still running (see '$0 status'); run '$0 stop' first"
    fi
    port_in_use "$port" && die "port $port is in use (another Ray head?); pick another with --port"
    port_in_use "$dashboard_port" && die "port $dashboard_port is in use; pick another with --dashboard-port"

    RAY_BIN="$(find_ray)"
    local bin_dir
    bin_dir="$(cd "$(dirname "$RAY_BIN")" && pwd)"
    PYTHON="$bin_dir/python"
    [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
    export PATH="$bin_dir:$PATH"            # the job's `python` is the one Ray runs with
    export RAY_USAGE_STATS_ENABLED=0
    # Token authentication (Ray's default for a new head): every node and client of this cluster runs with
    # RAY_AUTH_MODE=token and reads the token from ~/.ray/auth_token (made here if missing). RAY_AUTH_MODE=disabled
    # in the environment turns it off (then anyone on this machine can run code on the cluster).
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        "$RAY_BIN" get-auth-token --generate >/dev/null
    fi

    mkdir -p "$STATE_DIR"
    rm -f "$PID_FILE"
    echo "$port $dashboard_port $RAY_AUTH_MODE" >"$STATE_DIR/ports"
    # Ray's workers (and so every job's entrypoint) run in the directory `ray start` ran in: the repository
    # root, so configs/tiny.yaml and the default output_dir (runs/) resolve as they do for a local run.
    cd "$REPO_ROOT"

    echo "starting the head node (127.0.0.1:$port, dashboard http://127.0.0.1:$dashboard_port)"
    start_node head "$STATE_DIR/head.log" --head --node-ip-address 127.0.0.1 --port "$port" \
        --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --include-dashboard true \
        --num-cpus 0 --num-gpus 0 --temp-dir "$STATE_DIR/ray" --disable-usage-stats
    local deadline=$((SECONDS + 120))
    # Up = the job server answers HTTP (401 included: Ray enables token auth by default; clients on this
    # machine read the token from ~/.ray/auth_token).
    until "$PYTHON" -c "$HTTP_ANSWERS" "http://127.0.0.1:$dashboard_port/api/version" >/dev/null 2>&1; do
        if [[ -z "$(alive_recorded)" ]] || ((SECONDS > deadline)); then
            echo "error: the head node did not come up; see $STATE_DIR/head.log" >&2
            cmd_stop
            exit 1
        fi
        sleep 1
    done

    # One worker at a time: on a loaded machine, raylets registering all at once can miss Ray's startup deadline.
    local i
    for ((i = 1; i <= workers; i++)); do
        echo "starting worker node $i ($cpus CPUs, $gpus GPUs)"
        start_node "worker$i" "$STATE_DIR/worker$i.log" --address "127.0.0.1:$port" \
            --node-ip-address 127.0.0.1 --num-cpus "$cpus" --num-gpus "$gpus" --disable-usage-stats
        if ! wait_started "worker$i" "$STATE_DIR/worker$i.log"; then
            echo "error: worker node $i did not start; see $STATE_DIR/worker$i.log" >&2
            cmd_stop
            exit 1
        fi
    done
    if ! RAY_ADDRESS="127.0.0.1:$port" "$PYTHON" - "$((workers + 1))" <<'EOF'
import sys, time
import ray
ray.init(logging_level="ERROR", log_to_driver=False)
want, deadline = int(sys.argv[1]), time.monotonic() + 120
while sum(node["Alive"] for node in ray.nodes()) < want:
    if time.monotonic() > deadline:
        sys.exit(f"only {sum(n['Alive'] for n in ray.nodes())} of {want} nodes joined in 120 s")
    time.sleep(1)
print(f"{want} nodes up; cluster resources: {ray.cluster_resources()}")
EOF
    then
        echo "error: not every node joined; logs in $STATE_DIR" >&2
        cmd_stop
        exit 1
    fi

    cat <<EOF

Cluster up (logs and PIDs in $STATE_DIR). Submit the tiny run (it runs in $REPO_ROOT,
so the config path and runs/ are relative to it):

  export RAY_AUTH_MODE=$RAY_AUTH_MODE
  ray job submit --address http://127.0.0.1:$dashboard_port -- python -m rlhf_diffusion.launch configs/tiny.yaml

or join it from a driver on this machine:

  RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_ADDRESS=127.0.0.1:$port python -m rlhf_diffusion.launch configs/tiny.yaml

Stop it (only the processes started here): $0 stop
EOF
}

cmd_status() {
    local alive
    alive="$(alive_recorded)"
    if [[ -z "$alive" ]]; then
        echo "no cluster started by this script is running"
        return 0
    fi
    echo "running (name pid):"
    echo "$alive"
    local port dashboard_port auth_mode
    [[ -f "$STATE_DIR/ports" ]] || return 0
    read -r port dashboard_port auth_mode <"$STATE_DIR/ports"
    echo "dashboard / job server: http://127.0.0.1:$dashboard_port   GCS: 127.0.0.1:$port   RAY_AUTH_MODE=$auth_mode"
    RAY_AUTH_MODE="$auth_mode" "$(find_ray)" status --address "127.0.0.1:$port" || true
}

# Processes left in the process group of a recorded `ray start` that already exited (e.g. it failed after
# starting a raylet): only those whose command line names this script's Ray temp dir.
leftovers() {
    [[ -f "$PID_FILE" ]] || return 0
    local name pid
    while read -r name pid; do
        ps -eo pid=,pgid=,args= | awk -v g="$pid" -v d="$STATE_DIR/ray" '$2 == g && index($0, d) { print $1 }'
    done <"$PID_FILE"
}

cmd_stop() {
    local alive name pid stray
    stray="$(leftovers)"
    alive="$(alive_recorded)"
    if [[ -z "$alive" && -z "$stray" ]]; then
        echo "nothing to stop"
        rm -f "$PID_FILE"
        return 0
    fi
    # Workers first, the head last; each `ray start --block` is its own process group (setsid), and on SIGTERM
    # it stops the Ray processes it started.
    while read -r name pid; do
        echo "stopping $name (pid $pid)"
        kill -TERM -- "-$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 45))  # a head drains for up to 30 s
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done < <([[ -n "$alive" ]] && echo "$alive" | tac)
    stray="$(leftovers)"
    if [[ -n "$stray" ]]; then
        echo "stopping leftover Ray processes: $(echo $stray)"
        kill -KILL $stray 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    *) echo "error: unknown command '$1'" >&2; usage >&2; exit 2 ;;
esac
