#!/usr/bin/env bash
# Unpack Debian's Sendmail for the end-to-end tests without installing it (the
# sendmail packages conflict with postfix). Nothing outside the target
# directory is touched. Usage: tests/e2e/install-sendmail.sh [DIR]
# (default $TXMILT_SENDMAIL_ROOT, else /opt/txmilt-sendmail). Safe to rerun.
set -euo pipefail

DEST=${1:-${TXMILT_SENDMAIL_ROOT:-/opt/txmilt-sendmail}}
PACKAGES=(sendmail-bin sendmail-cf m4 libwrap0)

if [ -x "$DEST/usr/libexec/sendmail/sendmail" ] && [ -e "$DEST/usr/share/sendmail/cf/m4/cf.m4" ]; then
    echo "install-sendmail: already unpacked in $DEST"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if id _apt >/dev/null 2>&1; then
    chown _apt "$work"  # apt-get download runs as the _apt user where it can
fi
cd "$work"
if ! apt-get download -q "${PACKAGES[@]}"; then
    apt-get update -q
    apt-get download -q "${PACKAGES[@]}"
fi
mkdir -p "$DEST"
for deb in ./*.deb; do
    dpkg -x "$deb" "$DEST"
done
# The binary is setgid; the dynamic loader would then ignore LD_LIBRARY_PATH,
# which is how the tests point it at the unpacked libwrap0.
chmod g-s "$DEST/usr/libexec/sendmail/sendmail"
echo "install-sendmail: unpacked ${PACKAGES[*]} into $DEST"
