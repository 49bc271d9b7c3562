# /etc/cron.d/relayq: retries the queue every 30 minutes where systemd does not
# run relayq.service (sysvinit, a container); under systemd it does nothing.
# Every run is logged to syslog; exit 75 (mail left for later) is normal.
*/30 * * * * root [ -d /run/systemd/system ] || [ ! -x /usr/bin/relayq ] || /usr/bin/relayq flush >/dev/null 2>&1
