#!/bin/sh
# Unpack a Debian package the tests run but must not install, into a folder.
# logwatch depends on an MTA ("default-mta | mail-transport-agent"): installing
# it would install exim4 beside (over) relayq; its scripts run as well from here.
set -eu
pkg="$1"
dest="$2"
[ -d "$dest/usr" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "unpacking $pkg into $dest"
(cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null) || {
    echo "relayq: cannot download $pkg (apt-get download $pkg)" >&2
    exit 1
}
mkdir -p "$dest"
dpkg-deb -x "$tmp"/"$pkg"_*.deb "$dest"
