#!/bin/bash
# Queue scale beside Postfix, in one invocation: N queued messages in each,
# then mailq (first byte, whole listing), relayq status, and a queue run to
# a counting sink (time to the first message, time to empty, peak RSS).
# Needs the shared harness copied and set up (HARNESS, default /tmp/mtabench:
# smtp-sink/smtp-source) and Postfix installed by its adapter
# (`BENCH_DIR=$HARNESS bash $HARNESS/peers/postfix.sh install`). Run it in a
# loopback-only namespace:
#   unshare --net -- bash bench/scale-vs-postfix.sh 100000
# Prints figures; asserts nothing. Postfix is filled through its own smtpd
# with defer_transports = smtp; relayq's queue is written by bench/scale.py.
set -u
N=${1:-100000}
HERE=${RELAYQ_HOME:-"$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"}
H=${HARNESS:-/tmp/mtabench}
T=$H/.tools; export LD_LIBRARY_PATH=$T/lib
A=$HERE/bench/peer-adapter.sh; D=${RELAYQ_BENCH_DIR:-/var/tmp/relayq-bench}
ip link set lo up 2>/dev/null
ms() { date +%s%3N; }
firstbyte() {
    "$HERE/.venv/bin/python" - "$@" <<'PY'
import subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
p.stdout.read(1)
first = time.perf_counter() - t
n = 1 + len(p.stdout.read())
p.wait()
whole = time.perf_counter() - t
print(f"{' '.join(sys.argv[1:])[-48:]:>48}: first byte {first * 1000:7.1f} ms, "
      f"whole {whole * 1000:8.1f} ms, {n} bytes")
PY
}

echo "== Postfix: $N messages (defer_transports = smtp)"
postconf -e "defer_transports = smtp"
postfix start >/dev/null 2>&1; sleep 1
"$T/smtp-source" -s 20 -m "$N" -l 2048 -f a@example.org -t b@example.org 127.0.0.1:25
for _ in $(seq 900); do
    c=$(find /var/spool/postfix/deferred -type f | wc -l); [ "$c" -ge "$N" ] && break; sleep 1
done
echo "deferred: $c"; sync; sleep 3
for _ in 1 2 3; do firstbyte /usr/bin/mailq; done
echo "== Postfix: queue run (sink up, defer_transports removed, postqueue -f)"
# qmgr may scan the deferred queue when it restarts: let that scan fail against
# the closed port first, then start the sink, then time the flush
postconf -e "defer_transports ="; postfix reload >/dev/null 2>&1; sleep 1
for _ in $(seq 600); do  # until that scan is over: nothing left in the active queue
    [ "$(find /var/spool/postfix/active -type f | wc -l)" -eq 0 ] && break; sleep 1
done
rm -f /tmp/scale-pf.dump
"$T/smtp-sink" -u nobody -D /tmp/scale-pf.dump -c 127.0.0.1:2525 1000 >/dev/null 2>&1 & SINK=$!
sleep 0.5
[ -s /tmp/scale-pf.dump ] && echo "warning: Postfix delivered before the flush"
s=$(ms); /usr/sbin/postqueue -f
while [ ! -s /tmp/scale-pf.dump ]; do sleep 0.001; done; f=$(ms)
echo "first message at the sink after $((f - s)) ms"
peak=0
for _ in $(seq 900); do
    r=$(ps -C qmgr -o rss= | sort -n | tail -1); [ -n "$r" ] && [ "$r" -gt "$peak" ] && peak=$r
    c=$(find /var/spool/postfix/deferred /var/spool/postfix/active -type f | wc -l)
    [ "$c" -eq 0 ] && break; sleep 1
done
e=$(ms); echo "queue empty after $((e - s)) ms; qmgr peak RSS $peak KiB"
postfix stop >/dev/null 2>&1; kill $SINK

echo "== relayq: $N messages"
bash "$A" install; bash "$A" clear-queue
export RELAYQ_CACHE_DIR=$D/cache
"$HERE/.venv/bin/python" -c "import sys; sys.path.insert(0, '$HERE/bench'); import scale
scale.fill('$D/spool/queue', $N)"
sync; sleep 3
for _ in 1 2 3; do firstbyte "$D/root/usr/bin/mailq" -C "$D/relayq.toml"; done
for _ in 1 2 3; do firstbyte "$HERE/.venv/bin/relayq" -C "$D/relayq.toml" status; done
echo "== relayq: queue run (sendmail -q)"
rm -f /tmp/scale-rq.dump
"$T/smtp-sink" -u nobody -D /tmp/scale-rq.dump -c 127.0.0.1:2525 1000 >/dev/null 2>&1 & SINK=$!
sleep 0.5
s=$(ms)
/usr/bin/time -f "%M" -o /tmp/scale-rq.rss "$D/root/usr/sbin/sendmail" -C "$D/relayq.toml" -q & Q=$!
while [ ! -s /tmp/scale-rq.dump ]; do sleep 0.001; done; f=$(ms)
echo "first message at the sink after $((f - s)) ms"
wait $Q; e=$(ms)
echo "queue empty after $((e - s)) ms; peak RSS $(cat /tmp/scale-rq.rss) KiB" \
     "(the largest of sendmail -q and its workers)"
kill $SINK; bash "$A" clear-queue
