#!/usr/bin/env bash
# Install what the end-to-end tests need (Postfix, OpenDKIM, HAProxy, and libmilter-dev so
# that the txmilt-check test can build pymilter) without leaving the system services running
# or enabled.  Safe to run repeatedly.
set -euo pipefail

PACKAGES=(postfix opendkim opendkim-tools haproxy libmilter-dev)
export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

stop_system_services() {
    # The package's postinst may have started the system instance; the tests
    # run private instances only, so make sure nothing system-wide lingers.
    for svc in postfix opendkim haproxy; do
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            $SUDO systemctl stop "$svc" >/dev/null 2>&1 || true
        elif command -v invoke-rc.d >/dev/null 2>&1; then
            $SUDO invoke-rc.d "$svc" stop >/dev/null 2>&1 || true
        fi
        # Disable at boot; "systemctl disable" also works when systemd is
        # not running (it only edits the unit symlinks).
        if command -v systemctl >/dev/null 2>&1; then
            $SUDO systemctl disable "$svc" >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            $SUDO update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
    # Belt and braces: a default-config master started by the postinst.
    if [ -x /usr/sbin/postfix ] && $SUDO /usr/sbin/postfix status >/dev/null 2>&1; then
        $SUDO /usr/sbin/postfix stop >/dev/null 2>&1 || true
    fi
    if pgrep -x opendkim >/dev/null 2>&1 && [ -f /run/opendkim/opendkim.pid ]; then
        $SUDO kill "$(cat /run/opendkim/opendkim.pid)" >/dev/null 2>&1 || true
    fi
}

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-postfix: already installed: ${PACKAGES[*]}"
    stop_system_services
    exit 0
fi

echo "install-postfix: installing ${missing[*]}"
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
echo "postfix postfix/mailname string localhost" | $SUDO debconf-set-selections

# Keep the postinst from starting services while we install (policy-rc.d
# exit 101 = "action forbidden"); restore any existing policy afterwards.
POLICY=/usr/sbin/policy-rc.d
policy_backup=""
if [ -e "$POLICY" ]; then
    policy_backup=$(mktemp)
    $SUDO cp -p "$POLICY" "$policy_backup"
fi
restore_policy() {
    if [ -n "$policy_backup" ]; then
        $SUDO cp -p "$policy_backup" "$POLICY"
        rm -f "$policy_backup"
    else
        $SUDO rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
$SUDO chmod 755 "$POLICY"

apt_install() {
    $SUDO apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"
}

# Refresh the package lists only when they are absent or an install fails.
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    $SUDO apt-get update -q
    apt_install
elif ! apt_install; then
    $SUDO apt-get update -q
    apt_install
fi

stop_system_services
echo "install-postfix: done"
