#!/usr/bin/env bash
# Installs the Debian packages the integration and browser tests need, if they are missing:
# MariaDB and PostgreSQL server binaries (the tests start private instances on free ports),
# the sqlite3 shell (the printed `optsync up` command), Chromium (browser tests).
set -euo pipefail
missing=()
[ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}"
if [ "$(id -u)" != 0 ]; then
  echo "error: need root to install ${missing[*]} (apt-get); install them and run make test again" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Do not start or reconfigure the machine's own services: tests run private instances.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
