#!/bin/bash
# relayq as a candidate for the shared mtabench harness (../shared/bench):
#   run_baseline.sh --peers "postfix" --candidate "$PWD/bench/peer-adapter.sh"
# Contract: ../shared/bench/peers/TEMPLATE.sh. relayq runs from this checkout's
# .venv (make venv) with its own config, queue and cache under $RELAYQ_BENCH_DIR,
# so it sits beside whichever peer owns /usr/sbin/sendmail.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$HERE/.venv/bin"
DIR="${RELAYQ_BENCH_DIR:-/var/tmp/relayq-bench}"
CONF="$DIR/relayq.toml"
SINK_HOST="${BENCH_SINK_HOST:-127.0.0.1}"
SINK_PORT="${BENCH_SINK_PORT:-2525}"
LISTEN_PORT="${RELAYQ_BENCH_LISTEN_PORT:-2526}"   # peers own port 25
export RELAYQ_CACHE_DIR="$DIR/cache"

configure() {
    mkdir -p "$DIR"
    cat > "$CONF" <<CONF
smarthost = "[$SINK_HOST]:$SINK_PORT"
tls = "none"
queue_dir = "$DIR/spool"
pid_file = "$DIR/relayq.pid"
domain = "bench.example.org"
listen = ["127.0.0.1:$LISTEN_PORT"]
syslog = false
CONF
}

case "${1:-}" in
    label)          echo "relayq" ;;
    version)        "$BIN/relayq" version ;;
    submit-cmd)     echo "$DIR/root/usr/sbin/sendmail -C $CONF" ;;
    queue-cmd)      echo "$DIR/root/usr/sbin/sendmail -C $CONF -odq" ;;
    drain-prepare)  : ;;   # no queue runner unless listener-start started one
    flush)          "$BIN/sendmail" -C "$CONF" -q; rc=$?; [ $rc -eq 0 ] || [ $rc -eq 75 ] ;;
    flush-cmd)      echo "$BIN/sendmail -C $CONF -q" ;;
    queue-count)    find "$DIR/spool/queue" -name '*.e' 2>/dev/null | wc -l ;;
    drain-cleanup)  : ;;
    clear-queue)    find "$DIR/spool/queue" -mindepth 1 -delete 2>/dev/null; : ;;
    listener-start)
        "$BIN/relayq" -C "$CONF" daemon --listen >/dev/null || exit 1
        echo "127.0.0.1:$LISTEN_PORT" ;;
    listener-stop)
        [ -s "$DIR/relayq.pid" ] && kill "$(cat "$DIR/relayq.pid")" 2>/dev/null
        for _ in $(seq 100); do [ -e "$DIR/relayq.pid" ] || break; sleep 0.1; done ;;
    install|start)  # the launchers `relayq install` writes (python -IS), as a host would run
                    # them: with Debian's own python3 when it is relayq's version (a packaged
                    # relayq uses it; pyenv's shared-libpython build starts ~1 ms slower)
                    [ -x "$BIN/sendmail" ] || make -C "$HERE" venv >/dev/null; configure
                    "$BIN/relayq" install --root "$DIR/root" --venv --python /usr/bin/python3 \
                        >/dev/null 2>&1 || "$BIN/relayq" install --root "$DIR/root" --venv >/dev/null ;;
    stop)           bash "$0" listener-stop ;;
    purge)          bash "$0" listener-stop; rm -rf "$DIR" ;;
    *) echo "unknown action ${1:-}" >&2; exit 2 ;;
esac
