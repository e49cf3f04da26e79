#!/usr/bin/env bash
# Start a throw-away PostgreSQL on loopback for the tests and print its SQLAlchemy URL.
#
#   eval "$(bash .ci/postgres.sh start DIR)"   # exports TGFR_TEST_PG_URL, or says why not
#   bash .ci/postgres.sh stop DIR
#
# The server binaries come from PATH, then /usr/lib/postgresql/*/bin, then the distribution's
# packages (apt-get, when running as root). Nothing here fails the caller: when no server can
# be had, it prints why on stderr and exports nothing, and the PostgreSQL tests skip, saying so.
set -uo pipefail

cmd=${1:-start}
dir=${2:-${TMPDIR:-/tmp}/tgfr-ci-postgres}

find_bindir() {
    local initdb
    initdb=$(command -v initdb 2>/dev/null) && { dirname "$(readlink -f "$initdb")"; return 0; }
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    return 1
}

if [ "$cmd" = stop ]; then
    bindir=$(find_bindir) || exit 0
    [ -f "$dir/data/postmaster.pid" ] || exit 0
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$(stat -c %U "$dir/data")" -- "$bindir/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
    else
        "$bindir/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
    fi
    exit 0
fi

say() { echo "postgres.sh: $*" >&2; }

if ! bindir=$(find_bindir); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "no PostgreSQL server binaries; installing the distribution's postgresql package"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } \
            >"${TMPDIR:-/tmp}/tgfr-apt-postgres.log" 2>&1 \
            || say "apt-get install postgresql failed (see ${TMPDIR:-/tmp}/tgfr-apt-postgres.log)"
    fi
    bindir=$(find_bindir) || { say "no PostgreSQL server available: PostgreSQL tests will skip"; exit 0; }
fi

# initdb and postgres refuse to run as root: run them as an unprivileged user.
run=()
if [ "$(id -u)" = 0 ]; then
    user=postgres
    if ! id "$user" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$user" 2>/dev/null \
            || { say "cannot create a postgres user: PostgreSQL tests will skip"; exit 0; }
    fi
    run=(runuser -u "$user" --)
fi

rm -rf "$dir"
mkdir -p "$dir"
if [ ${#run[@]} -gt 0 ]; then
    chown "$user" "$dir"
    "${run[@]}" test -w "$dir" \
        || { say "$user cannot write to $dir (a parent not searchable?): PostgreSQL tests will skip"; exit 0; }
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if ! "${run[@]}" "$bindir/initdb" -D "$dir/data" -U tgfr --auth=trust -E UTF8 --no-locale \
        >"$dir/initdb.log" 2>&1; then
    say "initdb failed (see $dir/initdb.log): PostgreSQL tests will skip"
    exit 0
fi
# Loopback only, socket in the scratch folder, small and fast: a test server, not a real one.
if ! "${run[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null 2>&1; then
    say "the server did not start (see $dir/server.log): PostgreSQL tests will skip"
    exit 0
fi
echo "export TGFR_TEST_PG_URL='postgresql+psycopg://tgfr@127.0.0.1:$port/postgres'"
