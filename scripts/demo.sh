#!/usr/bin/env bash
# The seed's story, end to end, with real commands: mail submitted while the
# smarthost is down waits in the queue, mailq shows why, and the cron
# command `sendmail -Ac -q` delivers it once the smarthost is back.
# Everything lives in ./demo; the smarthost is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/demo
BIN=$ROOT/.venv/bin
rm -rf "$DEMO"
mkdir -p "$DEMO/smarthost-maildir"
SMARTHOST_PID=""
cleanup() {
    if [ -n "$SMARTHOST_PID" ]; then kill "$SMARTHOST_PID" 2>/dev/null || true; wait "$SMARTHOST_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$DEMO/relayq.toml" <<CONF
# relayq configuration for the demo: relay everything to a smarthost on loopback.
smarthost = "[127.0.0.1]:$PORT"
tls = "none"                     # the demo smarthost speaks plain SMTP
delivery_mode = "interactive"    # as sendmail's submit.cf: try at once, queue on failure
domain = "host.example.org"
queue_dir = "$DEMO/queue"
log_file = "$DEMO/maillog"
syslog = false
CONF
export RELAYQ_CONFIG="$DEMO/relayq.toml"
export PATH="$BIN:$PATH"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[36m$ %s\033[0m\n' "$*"; "$@"; }

say "Demo folder: $DEMO (config: $RELAYQ_CONFIG)"
cat "$RELAYQ_CONFIG"

say "1. The smarthost (127.0.0.1:$PORT) is down. A program hands mail to sendmail -t:"
printf '\033[36m$ sendmail -t <<MAIL ... MAIL\033[0m\n'
sendmail -t <<MAIL
From: Backup Job <backup@host.example.org>
To: admin@example.org
Subject: nightly backup finished

The nightly backup of /srv finished without errors.
MAIL
echo "sendmail exit status: $? (accepted: the message is safe in the queue)"

say "2. mailq -Ac shows it stuck, with the reason:"
run mailq -Ac

say "3. The smarthost comes up (a real SMTP server storing mail in a Maildir):"
"$BIN/python" -m relayq.testing.smarthost --host 127.0.0.1 --port "$PORT" \
    --maildir "$DEMO/smarthost-maildir" --port-file "$DEMO/smarthost.port" \
    >"$DEMO/smarthost.out" 2>&1 &
SMARTHOST_PID=$!
for _ in $(seq 100); do [ -s "$DEMO/smarthost.port" ] && break; sleep 0.1; done
cat "$DEMO/smarthost.out"

say "4. The seed's cron job runs the client queue:"
run sendmail -L sm-msp-queue -Ac -q -v
echo "exit status: $? (0: nothing left in the queue)"
run mailq -Ac

say "5. The smarthost received it; the delivered file:"
FILE=$(ls "$DEMO"/smarthost-maildir/new/* | head -n 1)
echo "$FILE"
cat "$FILE"

say "6. Laptop mode: with -odd nothing touches the network until a queue run:"
printf 'Subject: written offline\n\nHeld until the network is up.\n' | run sendmail -odd admin@example.org
run mailq -Ac
run sendmail -Ac -q
run mailq -Ac

say "7. The log, in sendmail's format ($DEMO/maillog):"
cat "$DEMO/maillog"
say "Done. Everything the demo made is in $DEMO; the smarthost has been stopped."
