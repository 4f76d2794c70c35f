# Shared by scripts/run, scripts/test and tests/conftest.py: a virtualenv with
# the project, and a running RabbitMQ (and Redis for the tests). Sourced, not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JUNEBUG_VENV:-$ROOT/.venv}"

say() { printf 'junebug-api: %s\n' "$*" >&2; }

LOCK_FILE="$ROOT/requirements/lock.txt"

need_python() {
    local python="$1"
    if ! command -v "$python" >/dev/null 2>&1; then
        say "Python 3.11 or newer is needed: install it (Debian: apt-get install python3 python3-venv)."
        exit 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        say "Python 3.11 or newer is needed; $python is $("$python" --version 2>&1)."
        exit 1
    fi
}

# pip, with its warnings about a configured index or find-links folder that
# does not exist on this machine left out (they are not about the install).
pip_in() {
    local venv="$1"
    shift
    "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 |
        { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; } >&2
}

# Make the virtualenv $1 hold exactly requirements/lock.txt (hash-checked; a
# package the lock no longer names is removed), then the project itself on
# top, editable, built with the locked setuptools: no resolving, nothing from
# the registry that the lock does not name.
install_locked() {
    local venv="$1"
    pip_in "$venv" install --quiet --require-hashes -r "$LOCK_FILE"
    local extra
    extra="$("$venv/bin/python" "$ROOT/scripts/lockfile.py" extras "$LOCK_FILE")"
    if [ -n "$extra" ]; then
        say "removing what the lock does not name: $extra"
        # shellcheck disable=SC2086
        pip_in "$venv" uninstall --quiet --yes $extra
    fi
    pip_in "$venv" install --quiet --no-deps --no-build-isolation -e "$ROOT"
}

setup_venv() {
    local python="${PYTHON:-python3}"
    need_python "$python"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtualenv $VENV"
        "$python" -m venv "$VENV"
    fi
    # Reinstall when the lock or the packaging metadata changed since the last
    # install: the stamp holds their digest.
    local stamp="$VENV/.junebug-installed" digest
    digest="$(cat "$LOCK_FILE" "$ROOT/setup.cfg" "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
        say "installing the locked dependencies (requirements/lock.txt) and junebug-api into $VENV"
        install_locked "$VENV"
        printf '%s\n' "$digest" >"$stamp"
    fi
    # twistd lists plugins from a dropin cache; rebuild it now so a stale one
    # (or one it cannot write later) never hides junebug-api.
    "$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
}

port_open() {
    "$VENV/bin/python" - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

ensure_rabbitmq() {
    local host="${AMQP_TEST_HOST:-127.0.0.1}" port="${AMQP_TEST_PORT:-5672}"
    if port_open "$host" "$port"; then
        return 0
    fi
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        say "RabbitMQ is not running on $host:$port and is not installed."
        say "Install it (Debian/Ubuntu: apt-get install rabbitmq-server), or point AMQP_TEST_HOST/AMQP_TEST_PORT at one."
        exit 1
    fi
    say "starting RabbitMQ (rabbitmq-server -detached)"
    rabbitmq-server -detached
    for _ in $(seq 1 120); do
        if port_open "$host" "$port"; then
            say "RabbitMQ is up"
            return 0
        fi
        sleep 1
    done
    say "RabbitMQ did not start within 120 s; see its logs (rabbitmq-diagnostics status)."
    exit 1
}

ensure_redis() {
    local host="${REDIS_TEST_HOST:-127.0.0.1}" port="${REDIS_TEST_PORT:-6379}"
    if port_open "$host" "$port"; then
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        say "Redis is not running on $host:$port and is not installed."
        say "Install it (Debian/Ubuntu: apt-get install redis-server)."
        exit 1
    fi
    say "starting Redis (redis-server --daemonize yes --port $port)"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no
    for _ in $(seq 1 30); do
        if port_open "$host" "$port"; then
            return 0
        fi
        sleep 1
    done
    say "Redis did not start within 30 s."
    exit 1
}
