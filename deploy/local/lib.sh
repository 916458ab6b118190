# Shared by the scripts of deploy/local/ that run a server in the background (kafka.sh,
# bigquery-emulator.sh, stack.sh): start it with its own pid file and log, wait until it
# answers, and stop it by its recorded pid only. Sourced, not run.

# wf_alive PID: the process exists and is not a zombie (a killed process whose parent has not
# reaped it yet is gone for every purpose here).
wf_alive() {
    local state
    # The state follows the command name in parentheses, which may itself hold spaces.
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# wf_running_pid PIDFILE PATTERN: print the recorded pid if that process is alive and its
# command line contains PATTERN (a reused pid belonging to another program is not ours).
wf_running_pid() {
    local pidfile=$1 pattern=$2 pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] || return 1
    if wf_alive "$pid" && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null \
        | grep -qF -- "$pattern"; then
        echo "$pid"; return 0
    fi
    return 1
}

# wf_spawn PIDFILE LOG COMMAND...: start COMMAND in the background (stdin closed, stdout and
# stderr to LOG), record its pid in PIDFILE and in $WF_PID. Started directly, not through a
# subshell, so the pid is the server's own.
wf_spawn() {
    local pidfile=$1 log=$2
    shift 2
    nohup "$@" > "$log" 2>&1 < /dev/null &
    WF_PID=$!
    echo "$WF_PID" > "$pidfile"
}

# wf_wait_answers PID SECONDS WHAT ADDRESS LOG CHECK...: poll the command CHECK every 0.5 s
# until it succeeds (0), the process PID exits (1, its log's tail shown) or SECONDS pass (1,
# the process killed).
wf_wait_answers() {
    local pid=$1 seconds=$2 what=$3 address=$4 log=$5
    shift 5
    local deadline=$((SECONDS + seconds))
    while [ $SECONDS -lt $deadline ]; do
        "$@" && return 0
        if ! wf_alive "$pid"; then
            echo "error: $what exited; its log ($log):" >&2
            tail -n 20 "$log" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "error: $what did not answer on $address within $seconds s; see $log" >&2
    kill "$pid" 2>/dev/null || true
    return 1
}

# wf_stop PIDFILE PATTERN [GRACE_S]: SIGTERM the recorded process if it is still ours (see
# wf_running_pid), SIGKILL it after GRACE_S seconds (default 5); remove PIDFILE.
wf_stop() {
    local pidfile=$1 pattern=$2 grace=${3:-5} pid
    if pid=$(wf_running_pid "$pidfile" "$pattern"); then
        kill "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + grace))
        while wf_alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do wf_alive "$pid" || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}
