# Sourced by single_node.sh and multi_node.sh. `run_job CMD...` runs the DeepSpeed launcher in a process group of its
# own and waits for the whole job. SIGTERM, SIGINT or SIGHUP to the script is passed to the ranks, which save a
# checkpoint and exit; the script then exits 143, once no process of the job is left. (Signalled itself, DeepSpeed's
# launcher dies alone and leaves the ranks training; its launch.py kills the ranks 30 s after a signal of its own.)

JOB_PID=""
JOB_STOPPING=0

stop_job() {
    JOB_STOPPING=1
    [[ -n $JOB_PID ]] || return 0
    echo "launch: signal received: the ranks save a checkpoint and exit (status 143)" >&2
    # the ranks (`python -u -m distributed_pt.train`), else the whole group (a stand-in launcher in the tests)
    pkill -TERM -g "$JOB_PID" -f -- '-m distributed_pt\.train' 2>/dev/null || kill -TERM -- "-$JOB_PID" 2>/dev/null || true
}

run_job() {
    echo "+ $*" >&2
    trap stop_job TERM INT HUP
    set -m # the job's own process group, so a terminal's Ctrl-C reaches the ranks through stop_job only
    "$@" &
    JOB_PID=$!
    set +m
    ((JOB_STOPPING)) && stop_job # a signal that came before the job existed
    local status=0
    while :; do
        wait "$JOB_PID" && status=0 || status=$?
        kill -0 "$JOB_PID" 2>/dev/null || break # `wait` returns early when a trapped signal arrives
    done
    while kill -0 -- "-$JOB_PID" 2>/dev/null; do sleep 0.5; done # launch.py and the ranks outlive the launcher
    trap - TERM INT HUP
    if ((JOB_STOPPING)); then
        exit 143
    fi
    exit "$status"
}
