#!/usr/bin/env bash
# Install trackproxy on a Debian or Ubuntu machine, as root:
#
#   scripts/install.sh [--prefix DIR] [--source DIR] [--no-start] [--root DIR]
#
#   --prefix DIR   where the virtualenv goes (DIR/venv); default /opt/trackproxy
#   --source DIR   the trackproxy checkout to install; default the one holding this script
#   --no-start     enable the units but start nothing
#   --root DIR     install config, state directory and units under DIR instead of /
#                  (a scratch root for tests and image builds). The virtualenv still goes
#                  to PREFIX as given, default DIR/opt/trackproxy: a virtualenv only works
#                  where it was made. No user, no ownership, no apt-get, no systemctl.
#
# What it does: python3-venv from apt if missing; the system user and group
# `trackproxy`; the virtualenv with trackproxy in it; /etc/trackproxy/trackproxy.yaml from
# conf/trackproxy.yaml, only if there is none (an operator's config is never touched);
# /var/lib/trackproxy; the systemd units; `trackproxy check-config`; then the sockets,
# the service and the renewal timer enabled and started.
#
# Idempotent: run it again (e.g. after `git pull`) and it reinstalls the package and
# refreshes the units, and changes nothing else.
set -euo pipefail
umask 022   # the venv and the units must stay readable by the service user

ROOT=/
PREFIX=
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=yes
# Debian's own Python: the service user must be able to run the virtualenv's
# interpreter, which one under /root (pyenv) or a home directory is not.
PYTHON=${PYTHON:-/usr/bin/python3}
USER_NAME=trackproxy
UNIT_PREFIX=/opt/trackproxy   # the prefix written in systemd/*.service
UNITS=(trackproxy-http.socket trackproxy-https.socket trackproxy.service
       trackproxy-renew.service trackproxy-renew.timer)
ENABLE=(trackproxy-http.socket trackproxy-https.socket trackproxy.service trackproxy-renew.timer)

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,12s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a directory"; SOURCE=$2; shift 2 ;;
        --no-start) START=no; shift ;;
        -h|--help) usage 0 ;;
        *) printf 'install.sh: unknown option %s\n' "$1" >&2; usage 2 >&2 ;;
    esac
done

ROOT=$(realpath -m "$ROOT")
R=${ROOT%/}                       # "" for the real root: "$R/etc" is /etc
[ -n "$PREFIX" ] || PREFIX="$R$UNIT_PREFIX"
PREFIX=$(realpath -m "$PREFIX")
# It is written into the units (sed, then systemd's command-line syntax): keep it plain.
[[ $PREFIX =~ ^/[A-Za-z0-9._/+-]*$ ]] || die "--prefix: use letters, digits and ._/+- only"
SOURCE=$(realpath -e "$SOURCE") || die "--source: no such directory"
if [ ! -f "$SOURCE/setup.cfg" ] || [ ! -d "$SOURCE/proxy" ]; then
    die "$SOURCE is not a trackproxy checkout"
fi
REAL_ROOT=no; [ "$ROOT" = / ] && REAL_ROOT=yes

VENV=$PREFIX/venv
CONF_DIR=$R/etc/trackproxy
CONF=$CONF_DIR/trackproxy.yaml
STATE=$R/var/lib/trackproxy
UNIT_DIR=$R/etc/systemd/system

skipped() { say "skipped in --root mode: $*"; }

if [ "$REAL_ROOT" = yes ] && [ "$(id -u)" -ne 0 ]; then
    die "run me as root (or with --root DIR for a scratch install)"
fi

# -- Python 3.11+ with venv ------------------------------------------------------------
if [ "$REAL_ROOT" = yes ] && [ ! -x "$PYTHON" ]; then
    say "installing python3"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "trackproxy needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1)"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$REAL_ROOT" = yes ]; then
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        die "$PYTHON has no venv module (apt-get install python3-venv); not installed in --root mode"
    fi
fi

# -- user and group --------------------------------------------------------------------
if [ "$REAL_ROOT" = yes ]; then
    if ! getent passwd "$USER_NAME" >/dev/null; then
        say "creating the system user $USER_NAME"
        group_option=(--group)
        getent group "$USER_NAME" >/dev/null && group_option=(--ingroup "$USER_NAME")
        if command -v adduser >/dev/null; then
            adduser --quiet --system "${group_option[@]}" --home /var/lib/trackproxy \
                --no-create-home "$USER_NAME"
        else
            getent group "$USER_NAME" >/dev/null || groupadd --system "$USER_NAME"
            useradd --system --gid "$USER_NAME" --home-dir /var/lib/trackproxy \
                --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
        fi
    fi
else
    skipped "system user $USER_NAME"
fi

# -- virtualenv ------------------------------------------------------------------------
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    # Missing, or its interpreter is gone (e.g. after a Debian release upgrade).
    say "creating the virtualenv $VENV"
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv --clear "$VENV"
fi
# Build from a copy: pip builds in the source tree, which must not gain root-owned
# build/ and *.egg-info/ directories in someone's checkout.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$SOURCE" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=./conf/local-state . | tar -C "$build" -xf -
say "installing trackproxy from $SOURCE into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --upgrade --constraint "$build/constraints.txt" "$build"
"$VENV/bin/trackproxy" --version >/dev/null

# -- configuration ---------------------------------------------------------------------
mkdir -p "$CONF_DIR"
chmod 0755 "$CONF_DIR"
NEW_CONFIG=no
if [ -e "$CONF" ]; then
    say "keeping the existing $CONF"
else
    say "writing $CONF from conf/trackproxy.yaml"
    install -m 0640 "$SOURCE/conf/trackproxy.yaml" "$CONF"
    NEW_CONFIG=yes
fi
if [ "$REAL_ROOT" = yes ]; then
    # Only a new file's owner is set: an existing one is the operator's business, but
    # the service must be able to read it (checked below, as the service user).
    [ "$NEW_CONFIG" = no ] || chown "root:$USER_NAME" "$CONF"
else
    skipped "ownership root:$USER_NAME of $CONF"
fi

# -- state directory -------------------------------------------------------------------
mkdir -p "$STATE"
chmod 0750 "$STATE"
if [ "$REAL_ROOT" = yes ]; then
    chown "$USER_NAME:$USER_NAME" "$STATE"
else
    skipped "ownership $USER_NAME:$USER_NAME of $STATE"
fi

# -- systemd units ---------------------------------------------------------------------
mkdir -p "$UNIT_DIR"
for unit in "${UNITS[@]}"; do
    wanted=$(sed "s|$UNIT_PREFIX/|$PREFIX/|g" "$SOURCE/systemd/$unit")
    if [ -f "$UNIT_DIR/$unit" ] && [ "$(cat "$UNIT_DIR/$unit")" = "$wanted" ]; then
        continue
    fi
    say "installing $UNIT_DIR/$unit"
    printf '%s\n' "$wanted" > "$UNIT_DIR/$unit.tmp"
    chmod 0644 "$UNIT_DIR/$unit.tmp"
    mv -f "$UNIT_DIR/$unit.tmp" "$UNIT_DIR/$unit"
done

# -- check the configuration the service will read -------------------------------------
if [ "$REAL_ROOT" = yes ]; then
    # As the service user: what it cannot run or read fails here, not at start.
    as_service=(runuser -u "$USER_NAME" --)
    "${as_service[@]}" "$VENV/bin/python" -c '' 2>/dev/null \
        || die "$USER_NAME cannot run $VENV/bin/python (is $PYTHON, $(readlink -f "$VENV/bin/python"), readable by all?)"
    "${as_service[@]}" test -r "$CONF" \
        || die "$USER_NAME cannot read $CONF: chgrp $USER_NAME $CONF && chmod g+r $CONF"
else
    as_service=()
fi
"${as_service[@]}" "$VENV/bin/trackproxy" check-config -c "$CONF" \
    || die "$CONF is not valid (see above); fix it and run me again"

# -- enable and start ------------------------------------------------------------------
if [ "$REAL_ROOT" = no ]; then
    skipped "systemctl daemon-reload; systemctl enable ${ENABLE[*]}"
elif [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: enable the units on the machine that runs them:"
    say "  systemctl enable --now ${ENABLE[*]}"
else
    systemctl daemon-reload
    if [ "$START" = yes ]; then
        if ! systemctl enable --now "${ENABLE[@]}"; then
            die "starting trackproxy failed (ports 80/443 taken by another server?):
  systemctl status ${ENABLE[*]}
  journalctl -u trackproxy.service -n 50"
        fi
        say "running: systemctl status trackproxy.service"
    else
        systemctl enable "${ENABLE[@]}"
        say "enabled, not started (--no-start): systemctl start ${ENABLE[*]}"
    fi
fi

cat <<EOF

trackproxy is installed ($("$VENV/bin/trackproxy" --version)).

Next, in $CONF$([ "$NEW_CONFIG" = yes ] && printf ' (the commented example)'):
  - domains:     your tracking domains, each a CNAME or A/AAAA record to this machine;
  - acme.email:  where Let's Encrypt writes about expiring certificates;
  - upstreams:   your own platform endpoints, if a built-in preset does not fit.
Then:
  $VENV/bin/trackproxy check-config -c /etc/trackproxy/trackproxy.yaml
  systemctl reload trackproxy.service
  $VENV/bin/trackproxy status
After an upgrade (running me again), \`systemctl restart trackproxy.service\` runs the
new code; the sockets stay open meanwhile.
EOF
