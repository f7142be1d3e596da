#!/usr/bin/env bash
# Runs the README's "Deploying for a team" steps on this machine and checks the result:
# two daphne processes, started as deploy/qwenweb@.service starts them, on a fresh PostgreSQL
# database and Redis, behind an nginx running deploy/nginx.conf. Prints PASS/FAIL lines and
# exits non-zero on any FAIL. It needs root, nginx, PostgreSQL and Redis, and takes about a
# minute; tests/test_deploy_check.py runs it in CI.
#
#   bash deploy/check.sh
#
# Checked: /healthz of each process and through nginx; static files (whitenoise, and the
# optional nginx location); sign-in through nginx (CSRF cookie and token, the Host header, the
# client address with QWENWEB_TRUSTED_PROXY_COUNT=1); a chat over a websocket through nginx,
# streamed live to a second tab on the other process; a rolling restart with the site up; a
# process killed mid-reply (interrupted by the other within a minute, then Continue);
# systemd-analyze verify of the unit; no errors in the logs.
#
# What it uses, all temporary and removed at the end (also on failure or Ctrl-C):
# - a copy of this work tree under /tmp (standing for /srv/qwenweb), with this tree's .venv;
# - a database qwenweb_check_<random> created on $QWENWEB_CHECK_POSTGRES (default
#   postgres://root@127.0.0.1:5432/postgres, trust auth) and dropped at the end;
# - Redis database 11 ($QWENWEB_CHECK_REDIS); pub/sub only, nothing is left in it;
# - daphne on two free loopback ports, nginx (as root, with -p/-c under /tmp, not the system
#   service) on a third; each stopped by its pid.
# No DASHSCOPE_API_KEY: every process runs the offline demo simulator for its replies.
# Installs nginx-light with apt-get if there is no nginx.

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY=$REPO/deploy
PG_ADMIN=${QWENWEB_CHECK_POSTGRES:-postgres://root@127.0.0.1:5432/postgres}
REDIS=${QWENWEB_CHECK_REDIS:-redis://127.0.0.1:6379/11}

passed=0
failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
info() { echo "     $*"; }
die() {
    fail "$*"
    exit 1  # the trap cleans up and prints the tally
}

TMP=""
DB=""
DAPHNE_PIDS=()
NGINX_PID=""

stop_pid() {  # stop_pid PID NAME: TERM, then KILL after 10 s
    local pid=$1 name=$2
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
        sleep 0.1
    done
    echo "     $name (pid $pid) did not stop on TERM: killing it"
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ -n "$NGINX_PID" ] && stop_pid "$NGINX_PID" nginx
    for pid in "${DAPHNE_PIDS[@]}"; do stop_pid "$pid" daphne; done
    if [ -n "$DB" ]; then
        psql "$PG_ADMIN" -qX -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 \
            || echo "     could not drop database $DB"
    fi
    [ -n "$TMP" ] && rm -rf "$TMP"
    echo "     cleaned up (processes stopped, database dropped, $TMP removed)"
    echo "check.sh: $passed passed, $failed failed"
    if [ "$failed" -gt 0 ] || [ "$status" -ne 0 ]; then
        exit 1
    fi
    exit 0
}
trap cleanup EXIT
trap 'echo "     interrupted"; exit 1' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() {  # wait_http URL SECONDS: until URL answers (any HTTP status)
    local url=$1 seconds=$2
    for _ in $(seq $((seconds * 5))); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" 2>/dev/null)" != 000 ] && return 0
        sleep 0.2
    done
    return 1
}

# --- Prerequisites ---------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root (nginx is started as root, as on a server)"
for tool in psql curl python3; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
if ! command -v nginx >/dev/null; then
    info "no nginx: apt-get install -y nginx-light"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) \
        >/dev/null 2>&1 || die "could not install nginx-light"
fi
for file in nginx.conf qwenweb@.service qwenweb.env.example; do
    [ -f "$DEPLOY/$file" ] || die "deploy/$file is missing"
done

TMP=$(mktemp -d /tmp/qwenweb-check.XXXXXX)
chmod 755 "$TMP"  # nginx's workers (www-data) use the temp dirs below it
APP=$TMP/srv/qwenweb
DATA=$TMP/data
ENV_FILE=$TMP/qwenweb.env
NGX=$TMP/nginx
mkdir -p "$APP" "$NGX" "$TMP/logs"
install -d -m 700 "$DATA"

# The README's helper qwenweb_env, taken from README.md, with this check's paths for
# /srv/qwenweb and /etc/qwenweb.env (and without sudo where there is none: this runs as root).
helper=$(grep -m1 '^qwenweb_env() {' "$REPO/README.md")
[ -n "$helper" ] || die "README.md has no 'qwenweb_env() { …' line"
helper=${helper//\/srv\/qwenweb/$APP}
helper=${helper//\/etc\/qwenweb.env/$ENV_FILE}
command -v sudo >/dev/null || helper=${helper//sudo /}
eval "$helper"

# --- Install: the code, its venv, the database, the env file ---------------------------------
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./staticfiles \
    --exclude=./test-artifacts --exclude=__pycache__ --exclude=./.pytest_cache \
    --exclude=./.ruff_cache -cf - . | tar -C "$APP" -xf - || die "copying the work tree failed"
# As `sudo git clone` leaves /srv/qwenweb (umask 022): readable by all, writable by root
# only, whatever the modes of this tree (a clone in a mktemp directory is 700).
chmod -R u+rwX,go+rX,go-w "$APP"
if [ -x "$REPO/.venv/bin/python" ]; then
    ln -s "$REPO/.venv" "$APP/.venv"
else
    python3 -m venv "$APP/.venv" || die "python3 -m venv failed"
fi
(cd "$APP" && .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt) \
    || die "pip install -r requirements.txt failed"
if ! "$APP/.venv/bin/python" -c 'import websockets' 2>/dev/null; then  # the check's client
    "$APP/.venv/bin/pip" install -q --disable-pip-version-check \
        "$(grep '^websockets==' "$APP/requirements-dev.txt")" || die "installing websockets failed"
fi
pass "code copied to $APP and requirements installed"

DB=qwenweb_check_$(python3 -c 'import secrets; print(secrets.token_hex(5))')
psql "$PG_ADMIN" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DB\"" >/dev/null \
    || { DB=""; die "could not create a database on $PG_ADMIN"; }
DATABASE_URL=${PG_ADMIN%/*}/$DB

# /etc/qwenweb.env from the example, with this machine's values; DJANGO_HTTPS=0 (no TLS here)
# and no DJANGO_CSRF_TRUSTED_ORIGINS (sign-in must work through nginx's Host header alone).
install -m 600 -o root -g root "$DEPLOY/qwenweb.env.example" "$ENV_FILE"
set_env() {  # set_env KEY VALUE: replace the example's line (commented or not)
    sed -i -E "/^#?$1=/d" "$ENV_FILE"
    printf '%s=%s\n' "$1" "$2" >>"$ENV_FILE"
}
set_env DASHSCOPE_API_KEY ""
set_env DATABASE_URL "$DATABASE_URL"
set_env REDIS_URL "$REDIS"
set_env DJANGO_SECRET_KEY "$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))')"
set_env DJANGO_ALLOWED_HOSTS 127.0.0.1
set_env DJANGO_CSRF_TRUSTED_ORIGINS ""
set_env DJANGO_HTTPS 0
set_env QWENWEB_DATA_DIR "$DATA"
if grep -qx 'QWENWEB_TRUSTED_PROXY_COUNT=1' "$ENV_FILE" && grep -qx 'DATABASE_CONN_MAX_AGE=0' "$ENV_FILE"; then
    pass "env file from deploy/qwenweb.env.example (mode $(stat -c %a "$ENV_FILE"), QWENWEB_TRUSTED_PROXY_COUNT=1, DATABASE_CONN_MAX_AGE=0)"
else
    fail "deploy/qwenweb.env.example should set QWENWEB_TRUSTED_PROXY_COUNT=1 and DATABASE_CONN_MAX_AGE=0"
fi

# --- The README's first steps: migrate, collectstatic, first admin ---------------------------
qwenweb_env .venv/bin/python manage.py migrate --noinput -v0 >"$TMP/logs/migrate.log" 2>&1 \
    && pass "manage.py migrate on PostgreSQL ($DB)" \
    || { cat "$TMP/logs/migrate.log"; die "manage.py migrate failed"; }
qwenweb_env env QWENWEB_COLLECTSTATIC=1 .venv/bin/python manage.py collectstatic --noinput -v0 \
    >"$TMP/logs/collectstatic.log" 2>&1 && [ -f "$APP/staticfiles/staticfiles.json" ] \
    && pass "collectstatic (hashed files and manifest in STATIC_ROOT)" \
    || { cat "$TMP/logs/collectstatic.log"; die "collectstatic failed"; }
qwenweb_env .venv/bin/python manage.py ensure_admin >"$TMP/logs/ensure_admin.log" 2>&1
ADMIN_PASSWORD=$(sed -n 's/^ *password: //p' "$TMP/logs/ensure_admin.log")
[ -n "$ADMIN_PASSWORD" ] && pass "ensure_admin created 'admin' and printed its password" \
    || { cat "$TMP/logs/ensure_admin.log"; die "ensure_admin printed no password"; }

# --- Two processes, each as qwenweb@.service runs it -----------------------------------------
UNIT=$DEPLOY/qwenweb@.service
EXEC_START=$(sed -n 's/^ExecStart=//p' "$UNIT")
WORK_DIR=$(sed -n 's/^WorkingDirectory=//p' "$UNIT")
[ -n "$EXEC_START" ] && [ "$WORK_DIR" = /srv/qwenweb ] \
    && [ "$(sed -n 's/^EnvironmentFile=//p' "$UNIT")" = /etc/qwenweb.env ] \
    || die "qwenweb@.service: expected WorkingDirectory=/srv/qwenweb, EnvironmentFile=/etc/qwenweb.env and an ExecStart"
start_process() {  # start_process PORT: as systemd would start qwenweb@PORT
    local port=$1 command=${EXEC_START//\/srv\/qwenweb/$APP}
    command=${command//%i/$port}
    # A clean environment plus EnvironmentFile, in WorkingDirectory.
    env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
        sh -c 'set -a && . "$1" && set +a && cd "$2" && exec $3' sh "$ENV_FILE" "$APP" "$command" \
        >>"$TMP/logs/daphne-$port.log" 2>&1 &
    STARTED_PID=$!
    DAPHNE_PIDS+=("$STARTED_PID")
}
PORTS=()
for _ in 1 2; do
    port=$(free_port)
    while [[ " ${PORTS[*]} " == *" $port "* ]]; do port=$(free_port); done
    PORTS+=("$port")
    start_process "$port"
done
info "started: ${EXEC_START//%i/<port>} on ports ${PORTS[*]} (pids ${DAPHNE_PIDS[*]})"
for port in "${PORTS[@]}"; do
    if wait_http "http://127.0.0.1:$port/healthz" 30; then
        body=$(curl -sS -w ' (HTTP %{http_code})' "http://127.0.0.1:$port/healthz")
        if [[ "$body" == *'"database": "ok", "channel_layer": "ok"'*'(HTTP 200)' ]]; then
            pass "process on 127.0.0.1:$port: /healthz $body"
        else
            fail "process on 127.0.0.1:$port: /healthz $body"
        fi
    else
        cat "$TMP/logs/daphne-$port.log"
        die "process on 127.0.0.1:$port does not answer /healthz"
    fi
done

# --- nginx with deploy/nginx.conf -------------------------------------------------------------
NGINX_PORT=$(free_port)
SITE=$NGX/qwenweb.conf
sed -e "s/server 127\.0\.0\.1:8001 /server 127.0.0.1:${PORTS[0]} /" \
    -e "s/server 127\.0\.0\.1:8002 /server 127.0.0.1:${PORTS[1]} /" \
    -e "s/^\( *\)listen 80;/\1listen 127.0.0.1:$NGINX_PORT;/" \
    -e '/^ *listen \[::\]:80;/d' \
    -e 's/server_name chat\.example\.com;/server_name 127.0.0.1;/' \
    "$DEPLOY/nginx.conf" >"$SITE"
grep -q "server 127.0.0.1:${PORTS[0]} " "$SITE" && grep -q "server 127.0.0.1:${PORTS[1]} " "$SITE" \
    && grep -q "listen 127.0.0.1:$NGINX_PORT;" "$SITE" && grep -q "server_name 127.0.0.1;" "$SITE" \
    || die "deploy/nginx.conf: expected upstream servers 127.0.0.1:8001 and :8002, 'listen 80;' and 'server_name chat.example.com;'"
cat >"$NGX/nginx.conf" <<EOF
# The main config around deploy/nginx.conf (Debian's /etc/nginx/nginx.conf does the same).
daemon off;
user www-data;
worker_processes 1;
pid $NGX/nginx.pid;
error_log $NGX/error.log;
events { worker_connections 256; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format check '\$request_uri \$status upstream=\$upstream_addr';
    access_log $NGX/access.log check;
    client_body_temp_path $NGX/client_body;
    proxy_temp_path $NGX/proxy;
    fastcgi_temp_path $NGX/fastcgi;
    uwsgi_temp_path $NGX/uwsgi;
    scgi_temp_path $NGX/scgi;
    include $SITE;
}
EOF
if nginx -t -q -p "$NGX/" -e "$NGX/error.log" -c "$NGX/nginx.conf" 2>"$TMP/logs/nginx-t.log"; then
    pass "nginx -t accepts deploy/nginx.conf (nginx $(nginx -v 2>&1 | sed 's|.*/||'))"
else
    cat "$TMP/logs/nginx-t.log"
    die "nginx -t rejects deploy/nginx.conf"
fi
nginx -p "$NGX/" -e "$NGX/error.log" -c "$NGX/nginx.conf" >"$TMP/logs/nginx.log" 2>&1 &
NGINX_PID=$!
SITE_URL=http://127.0.0.1:$NGINX_PORT
wait_http "$SITE_URL/healthz" 10 || { cat "$NGX/error.log"; die "nginx does not answer on $SITE_URL"; }
info "nginx on $SITE_URL (pid $NGINX_PID) in front of ports ${PORTS[*]}"

# --- Through nginx: health, static, sign-in, a chat over the websocket ------------------------
cat >"$TMP/client.py" <<'EOF'
"""The browser's part, through nginx: prints PASS/FAIL lines; exit status 1 on any FAIL."""

import asyncio
import json
import os
import re
import sys
import uuid

import httpx
import websockets

site, password = sys.argv[1], sys.argv[2]
failures = 0


def check(ok: bool, what: str) -> bool:
    global failures
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    failures += not ok
    return ok


def token(page: str) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)


browser = {"Origin": site, "Referer": f"{site}/accounts/login/"}
with httpx.Client(base_url=site, timeout=10) as client:
    response = client.get("/healthz")
    body = response.json()
    check(
        response.status_code == 200 and body["database"] == body["channel_layer"] == "ok",
        f"through nginx: /healthz {response.status_code} {json.dumps(body)}",
    )

    page = client.get("/accounts/login/").text
    css = re.search(r'href="(/static/[^"]+\.css)"', page)
    if check(css is not None, "login page links its stylesheet"):
        response = client.get(css.group(1))
        check(
            response.status_code == 200 and "max-age=315360000" in response.headers.get("cache-control", ""),
            f"through nginx: {css.group(1)} {response.status_code} from whitenoise "
            f"(cache-control: {response.headers.get('cache-control')})",
        )

    # Both sign-ins with a forged X-Forwarded-For: the app must use the address nginx saw.
    client.cookies.clear()
    page = client.get("/accounts/login/").text
    response = client.post(
        "/accounts/login/",
        data={"username": "nobody", "password": "wrong", "csrfmiddlewaretoken": token(page)},
        headers={**browser, "X-Forwarded-For": "203.0.113.9"},
    )
    check(response.status_code == 200 and "didn" in response.text,
          f"wrong password refused ({response.status_code})")

    page = client.get("/accounts/login/").text
    response = client.post(
        "/accounts/login/",
        data={"username": "admin", "password": password, "csrfmiddlewaretoken": token(page)},
        headers={**browser, "X-Forwarded-For": "203.0.113.9"},
    )
    if not check(response.status_code == 302 and "sessionid" in client.cookies,
                 f"through nginx: signed in as admin (CSRF cookie + form token), {response.status_code} → {response.headers.get('location')}"):
        sys.exit(1)
    home = client.get("/").text
    response = client.post(
        "/c/new/", data={"csrfmiddlewaretoken": token(home)},
        headers={"Origin": site, "Referer": f"{site}/"},
    )
    location = response.headers.get("location", "")
    if not check(response.status_code == 302 and re.fullmatch(r"/c/[0-9a-f-]{36}/", location) is not None,
                 f"new conversation {location}"):
        sys.exit(1)
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    with open(sys.argv[3], "w") as file:  # for crash.py
        json.dump({"cookie": cookie, "csrftoken": client.cookies["csrftoken"]}, file)

    async def chat() -> None:
        ws_url = site.replace("http://", "ws://") + "/ws" + location
        headers = {"Cookie": cookie}
        # Two tabs, opened one after the other: nginx's round robin puts them on the two
        # processes. The message goes in through the first; both must show the whole reply.
        async with (
            websockets.connect(ws_url, additional_headers=headers, origin=site) as first,
            websockets.connect(ws_url, additional_headers=headers, origin=site) as second,
        ):
            await first.send(json.dumps({"type": "send", "content": "hello",
                                         "client_message_id": str(uuid.uuid4())}))

            async def read(socket) -> tuple[str, int, str]:
                text, frames, last_pk = "", 0, None
                while True:
                    frame = await asyncio.wait_for(socket.recv(), 30)
                    if frame.startswith("+"):
                        pk, _, delta = frame[1:].partition(":")
                        last_pk = pk or last_pk
                        text += delta
                        frames += 1
                    for role, status in re.findall(
                        r'<article id="message-\d+"[^>]*data-role="(\w+)" data-status="(\w+)"', frame
                    ):
                        if role == "assistant" and status != "streaming":
                            return text, frames, status

            (text_1, frames_1, status_1), (text_2, frames_2, status_2) = await asyncio.gather(
                read(first), read(second)
            )
        check(status_1 == "complete" and frames_1 > 1 and text_1.strip() != "",
              f"websocket through nginx: sent 'hello', reply streamed in {frames_1} frames "
              f"({len(text_1)} characters) to the end: status {status_1}")
        check(status_2 == "complete" and frames_2 > 0,
              f"second tab got the same reply live ({frames_2} frames): status {status_2}")

    try:
        asyncio.run(chat())
    except Exception as exc:
        check(False, f"websocket through nginx: {type(exc).__name__}: {exc}")

    export = client.get(location + "export.json").json()
    last = export["messages"][-1] if export["messages"] else {"role": None, "status": None, "content": ""}
    check(last["role"] == "assistant" and last["status"] == "complete" and last["content"],
          f"export.json: the reply is saved, complete ({len(last['content'])} characters): "
          f"{last['content'][:60]!r}…")

    # An image of several MB (uploads may be up to 7 MB) passes nginx's client_max_body_size.
    import io
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (1200, 1200), os.urandom(1200 * 1200 * 3)).save(buffer, format="PNG")
    response = client.post(
        location + "images/", files={"image": ("big.png", buffer.getvalue(), "image/png")},
        headers={"Origin": site, "Referer": f"{site}{location}", "X-CSRFToken": client.cookies["csrftoken"]},
    )
    check(response.status_code == 200 and "id" in response.json(),
          f"through nginx: a {len(buffer.getvalue()) / 2**20:.1f} MB image uploaded ({response.status_code})")
sys.exit(1 if failures else 0)
EOF
"$APP/.venv/bin/python" "$TMP/client.py" "$SITE_URL" "$ADMIN_PASSWORD" "$TMP/session.json" | tee "$TMP/logs/client.log"
client_status=${PIPESTATUS[0]}
passed=$((passed + $(grep -c '^PASS' "$TMP/logs/client.log")))
failed=$((failed + $(grep -c '^FAIL' "$TMP/logs/client.log")))
[ "$client_status" -eq 0 ] || grep -q '^FAIL' "$TMP/logs/client.log" \
    || fail "the client script stopped early (see above)"

# Sign-ins are counted per client address (lockouts): nginx's view of it, not the forged header.
addresses=$(qwenweb_env .venv/bin/python manage.py shell -v0 -c \
    'from axes.models import AccessLog; print(",".join(sorted({a.ip_address for a in AccessLog.objects.all()})))' 2>&1 | tail -n1)
[ "$addresses" = 127.0.0.1 ] \
    && pass "the sign-in was logged from 127.0.0.1 (QWENWEB_TRUSTED_PROXY_COUNT=1), not the forged X-Forwarded-For 203.0.113.9" \
    || fail "sign-ins logged from '$addresses', expected 127.0.0.1"

# No sticky sessions: the two sockets went to different processes.
sleep 0.5  # nginx logs a websocket when it closes
upstreams=$(grep '^/ws/' "$NGX/access.log" | sed 's/.*upstream=//' | sort -u | tr '\n' ' ')
[ "$(grep '^/ws/' "$NGX/access.log" | sed 's/.*upstream=//' | sort -u | wc -l)" -eq 2 ] \
    && pass "the two tabs' websockets were served by different processes: $upstreams" \
    || fail "expected the websockets on both processes, nginx logged: $upstreams"

# --- The optional static location: nginx serves STATIC_ROOT itself --------------------------
# Uncomment deploy/nginx.conf's "location /static/" block, point it at this check's checkout,
# reload nginx (HUP to its pid) and fetch the stylesheet: nginx's 7-day expiry, not whitenoise's.
sed -i -e '/^ *# location \/static\/ {/,/^ *# }/s/^\( *\)# /\1/' -e "s|/srv/qwenweb/staticfiles/|$APP/staticfiles/|" "$SITE"
css=$(sed -n 's/.*"qwenweb\/app.css": "\([^"]*\)".*/\1/p' "$APP/staticfiles/staticfiles.json")
if grep -q "^ *location /static/ {" "$SITE" && nginx -t -q -p "$NGX/" -e "$NGX/error.log" -c "$NGX/nginx.conf" 2>/dev/null; then
    kill -HUP "$NGINX_PID"
    for _ in $(seq 50); do  # until the new workers answer
        headers=$(curl -sS -D - -o /dev/null "$SITE_URL/static/$css")
        grep -qi '^cache-control: max-age=604800' <<<"$headers" && break
        sleep 0.1
    done
    if grep -q '^HTTP/1.1 200' <<<"$headers" && grep -qi '^cache-control: max-age=604800' <<<"$headers"; then
        pass "optional location /static/: nginx serves /static/$css from STATIC_ROOT"
    else
        fail "optional location /static/: $(tr -d '\r' <<<"$headers" | tr '\n' ' ')"
    fi
else
    fail "deploy/nginx.conf's commented 'location /static/' block does not work uncommented"
fi

# --- A rolling restart, as in the README's upgrade steps --------------------------------------
# Stop each process in turn (systemctl restart sends TERM), check that the site answers through
# nginx meanwhile, start it again and wait for its /healthz with the README's curl.
for i in 0 1; do
    port=${PORTS[$i]}
    stop_pid "${DAPHNE_PIDS[$i]}" daphne
    codes=""
    for _ in 1 2 3 4; do
        codes+="$(curl -s -o /dev/null -w '%{http_code}' "$SITE_URL/healthz") "
        codes+="$(curl -s -o /dev/null -w '%{http_code}' "$SITE_URL/accounts/login/") "
    done
    start_process "$port"
    DAPHNE_PIDS[$i]=$STARTED_PID
    unset 'DAPHNE_PIDS[-1]'
    if curl -fs --retry 30 --retry-connrefused --retry-delay 1 -o /dev/null "http://127.0.0.1:$port/healthz" \
        && [ "$codes" = "200 200 200 200 200 200 200 200 " ]; then
        pass "rolling restart of :$port: the site answered through nginx meanwhile ($codes), the process is back"
    else
        fail "rolling restart of :$port: through nginx meanwhile: $codes"
    fi
done

# --- A process killed in the middle of a reply ------------------------------------------------
# A tab on each process; the message goes in through the first, whose process is killed
# (SIGKILL) once the reply has a checkpoint. The other process must mark the reply interrupted
# within a minute, keeping that text, and Continue, sent through it, must finish the reply.
cat >"$TMP/crash.py" <<'EOF'
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid

import httpx
import websockets

site, url_a, url_b, pid_a, session_file = sys.argv[1:6]
session = json.load(open(session_file))
headers = {"Cookie": session["cookie"]}
ARTICLE = re.compile(r'<article id="message-\d+"[^>]*data-role="assistant" data-status="(\w+)"')
failures = 0


def check(ok: bool, what: str) -> None:
    global failures
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    failures += not ok


async def until_status(socket, wanted: set[str], timeout: float) -> tuple[str, int]:
    loop = asyncio.get_running_loop()
    frames, deadline = 0, loop.time() + timeout
    while True:
        frame = await asyncio.wait_for(socket.recv(), deadline - loop.time())
        frames += frame.startswith("+")
        for status in ARTICLE.findall(frame):
            if status in wanted:
                return status, frames


async def main() -> None:
    async with httpx.AsyncClient(headers=headers, timeout=10) as http:

        async def last_reply(location: str) -> dict:
            export = (await http.get(f"{url_b}{location}export.json")).json()
            return export["messages"][-1] if export["messages"] else {}

        # Kill A once the reply has a checkpoint (a demo reply takes ~2.5 s, checkpoints come
        # every 2 s): a reply that ends first is tried again in a new chat.
        for attempt in range(1, 6):
            response = await http.post(
                f"{site}/c/new/", data={"csrfmiddlewaretoken": session["csrftoken"]},
                headers={"Origin": site, "Referer": f"{site}/"},
            )
            location = response.headers["location"]
            ws_a, ws_b = (u.replace("http://", "ws://") + "/ws" + location for u in (url_a, url_b))
            tab_a = await websockets.connect(ws_a, additional_headers=headers, origin=url_a)
            tab_b = await websockets.connect(ws_b, additional_headers=headers, origin=url_b)
            await tab_a.send(json.dumps({"type": "send", "content": "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2,
                                         "client_message_id": str(uuid.uuid4())}))
            kept = None
            for _ in range(200):
                reply = await last_reply(location)
                if reply.get("role") == "assistant" and reply["status"] != "streaming":
                    break  # over before a checkpoint
                if reply.get("role") == "assistant" and reply["content"]:
                    os.kill(int(pid_a), signal.SIGKILL)
                    kept = reply["content"]
                    break
                await asyncio.sleep(0.03)
            if kept is not None:
                break
            await tab_a.close()
            await tab_b.close()
        else:
            check(False, "no demo reply lasted until its first checkpoint in 5 tries")
            return
        killed = time.monotonic()
        try:
            status, _ = await until_status(tab_b, {"interrupted", "complete", "error"}, 90)
        except TimeoutError:
            status = "still streaming after 90 s"
        seconds = time.monotonic() - killed
        reply = await last_reply(location)
        check(status == "interrupted" and seconds < 60 and reply["content"] == kept,
              f"process on {url_a} killed (SIGKILL) mid-reply: the other process marked the reply "
              f"{status} after {seconds:.0f} s, keeping its last checkpoint ({len(reply['content'])} "
              f"characters; try {attempt})")
        if status == "interrupted":
            await tab_b.send(json.dumps({"type": "continue"}))
            try:
                status, frames = await until_status(tab_b, {"complete", "error", "stopped"}, 30)
            except TimeoutError:
                status, frames = "no end within 30 s", 0
            reply = await last_reply(location)
            check(status == "complete" and reply["content"].startswith(kept) and len(reply["content"]) > len(kept),
                  f"Continue through the other process finished it: {status} ({frames} more frames, "
                  f"{len(reply['content'])} characters)")
        await tab_b.close()
        with contextlib.suppress(Exception):
            await tab_a.close()


try:
    asyncio.run(main())
except Exception as exc:
    check(False, f"crash check: {type(exc).__name__}: {exc}")
sys.exit(1 if failures else 0)
EOF
info "killing the process on :${PORTS[0]} mid-reply; the sweep takes up to a minute…"
{  # (bash's "Killed" notice for the killed process goes to crash.stderr, not the screen)
    "$APP/.venv/bin/python" "$TMP/crash.py" "$SITE_URL" "http://127.0.0.1:${PORTS[0]}" \
        "http://127.0.0.1:${PORTS[1]}" "${DAPHNE_PIDS[0]}" "$TMP/session.json" | tee "$TMP/logs/crash.log"
    wait "${DAPHNE_PIDS[0]}"
} 2>"$TMP/logs/crash.stderr"
passed=$((passed + $(grep -c '^PASS' "$TMP/logs/crash.log")))
failed=$((failed + $(grep -c '^FAIL' "$TMP/logs/crash.log")))
grep -q 'PASS\|FAIL' "$TMP/logs/crash.log" || fail "the crash check printed nothing"
if grep -q 'Reply [0-9]* lost its process: marked interrupted' "$TMP/logs/daphne-${PORTS[1]}.log"; then
    pass "the other process logged it: $(grep -o 'Reply [0-9]* lost its process: marked interrupted' "$TMP/logs/daphne-${PORTS[1]}.log" | head -1)"
fi

# --- The unit file -------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    # verify needs an instance and an ExecStart that exists: a copy pointing at this check's code.
    mkdir -p "$TMP/unit"
    sed "s|/srv/qwenweb|$APP|g" "$UNIT" >"$TMP/unit/qwenweb@${PORTS[0]}.service"
    output=$(systemd-analyze verify "$TMP/unit/qwenweb@${PORTS[0]}.service" 2>&1)
    if [ $? -eq 0 ] && [ -z "$output" ]; then
        pass "systemd-analyze verify qwenweb@${PORTS[0]}.service: no complaints"
    else
        fail "systemd-analyze verify: $output"
    fi
    exposure=$(systemd-analyze security --offline=yes "$TMP/unit/qwenweb@${PORTS[0]}.service" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: //p')
    [ -n "$exposure" ] && info "systemd-analyze security: exposure $exposure"
else
    info "SKIP systemd-analyze is not installed: qwenweb@.service not verified"
fi

# --- Logs ----------------------------------------------------------------------------------
for port in "${PORTS[@]}"; do
    if grep -qE 'Traceback|ERROR' "$TMP/logs/daphne-$port.log"; then
        fail "errors in the log of the process on :$port:"
        sed 's/^/     | /' "$TMP/logs/daphne-$port.log"
    else
        pass "log of the process on :$port has no errors ($(wc -l <"$TMP/logs/daphne-$port.log") lines)"
    fi
done
# Refused connections are the rolling restart's, passed on to the other process.
nginx_errors=$(grep -E '\[(error|crit|alert|emerg)\]' "$NGX/error.log" | grep -v '(111: Connection refused) while connecting to upstream')
if [ -n "$nginx_errors" ]; then
    fail "nginx error log:"
    sed 's/^/     | /' <<<"$nginx_errors"
else
    pass "nginx error log: nothing but the refused connections of the rolling restart ($(grep -c 'Connection refused' "$NGX/error.log"))"
fi
