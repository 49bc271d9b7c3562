#!/bin/sh
# `make deb`: build relayq_VERSION_all.deb from this tree (committed or not) in
# build/deb/, then run lintian on it: errors and warnings fail the build (a
# warning is fixed, or explained in debian/relayq.lintian-overrides).
set -eu
# Debian's own tools and python3, whatever the caller's PATH (pyenv, a venv) says
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME PYTHONSTARTUP
top=$(cd "$(dirname "$0")/.." && pwd)
out=${RELAYQ_DEB_OUT:-$top/build/deb}
work=$out/src
rm -rf "$work"
mkdir -p "$work/relayq"
cd "$top"
# the files git knows plus new ones not ignored: never .venv, build/ or caches
git ls-files -z --cached --others --exclude-standard \
	| tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/relayq"
cd "$work/relayq"
log=$out/build.log
if ! dpkg-buildpackage -us -uc -b > "$log" 2>&1; then
	tail -n 30 "$log" >&2
	echo "make deb: dpkg-buildpackage failed; the whole log is $log" >&2
	exit 1
fi
cd "$work"
rm -f "$out"/relayq_*.deb "$out"/relayq_*.buildinfo "$out"/relayq_*.changes
mv relayq_*.deb relayq_*.buildinfo relayq_*.changes "$out"/
deb=$(ls "$out"/relayq_*_all.deb)
# lintian warns when run as root: as root, run it as nobody
as=""
[ "$(id -u)" -eq 0 ] && as="runuser -u nobody -- env HOME=/tmp"
$as lintian --fail-on error,warning --display-info "$deb" > "$out/lintian.txt" 2>&1 || {
	cat "$out/lintian.txt" >&2
	echo "make deb: lintian: errors or unexplained warnings (fix them or explain them in debian/relayq.lintian-overrides)" >&2
	exit 1
}
sed 's/^/lintian: /' "$out/lintian.txt"
echo "$deb"
