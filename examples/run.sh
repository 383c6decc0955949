#!/bin/bash
# make run / make stop: the module in front of a local demo provider.
#   start: demo provider on 127.0.0.1:8081 (OpenAI-style list, 300 ms),
#          nginx on 127.0.0.1:8080, then a short tour of the cache.
#   stop:  stops both, by the pids this script recorded.

set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
dir=$top/build/run
module=$top/build/ngx_http_modelcache_module.so
nginx=${NGINX_BIN:-/usr/sbin/nginx}
url=http://127.0.0.1:8080

stop() {
    for f in "$dir/nginx.pid" "$dir/provider.pid"; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill -QUIT "$pid" 2>/dev/null || true
            i=0
            while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do
                sleep 0.1; i=$((i + 1))
            done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
        rm -f "$f"
    done
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() {
    i=0
    until ! port_free "$1"; do
        i=$((i + 1))
        [ $i -lt 100 ] || { echo "nothing listens on port $1" >&2; exit 1; }
        sleep 0.1
    done
}

show() {
    echo
    printf '$ curl'; printf " %q" "$@"; echo
    curl -s -o /dev/null -D - -w 'time: %{time_total}s\n' "$@" \
        | grep -iE '^(HTTP|x-modelcache|age|etag|cache-control|time)' \
        | tr -d '\r'
}

body() {
    echo
    printf '$ curl'; printf " %q" "$@"; echo
    curl -s "$@" | python3 -c 'import json, sys
d = json.load(sys.stdin)
if "data" in d:
    d["data"] = [m["id"] for m in d["data"]]
print(json.dumps(d))'
}

start() {
    stop
    mkdir -p "$dir"

    for p in 8080 8081; do
        port_free $p || { echo "port $p is in use; stop what uses it" >&2; exit 1; }
    done

    python3 "$top/t/mock/provider.py" --port 8081 \
        --fixtures "$top/examples/fixtures" --delay-ms 300 \
        >"$dir/provider.log" 2>&1 &
    echo $! > "$dir/provider.pid"
    wait_port 8081

    sed -e "s|@DIR@|$dir|g" -e "s|@MODULE@|$module|g" \
        "$top/examples/nginx.conf.in" > "$dir/nginx.conf"
    "$nginx" -p "$dir/" -c "$dir/nginx.conf"
    wait_port 8080

    echo "demo provider: 127.0.0.1:8081 (answers after 300 ms)"
    echo "nginx + modelcache: $url  (config: $dir/nginx.conf)"

    echo; echo "# the first request misses and waits for the provider:"
    show -H 'Authorization: Bearer demo-key' "$url/v1/models"
    echo; echo "# the next ones are answered from shared memory:"
    show -H 'Authorization: Bearer demo-key' "$url/v1/models"
    show -H 'Authorization: Bearer demo-key' "$url/v1/models"
    echo; echo "# one model, and a filtered page (models shown by id), from the same entry:"
    body -H 'Authorization: Bearer demo-key' "$url/v1/models/gpt-4o"
    body -H 'Authorization: Bearer demo-key' \
        "$url/v1/models?q=gpt-4o&sort=-created&limit=2"
    echo; echo "# another key or profile is another entry:"
    show -H 'Authorization: Bearer other-key' -H 'X-Profile: team-b' \
        "$url/v1/models"
    echo; echo "# ?nocache=1 asks the provider again (ten at once would cost one fetch):"
    show -H 'Authorization: Bearer demo-key' "$url/v1/models?nocache=1"
    echo; echo "# purge, then the next request misses again:"
    echo "\$ curl -X PURGE $url/_modelcache/purge"
    curl -s -X PURGE "$url/_modelcache/purge"
    show -H 'Authorization: Bearer demo-key' "$url/v1/models"
    echo; echo "# stats:"
    echo "\$ curl $url/_modelcache/stats"
    curl -s "$url/_modelcache/stats"
    echo
    echo "Both keep running; stop them with: make stop"
}

case "${1:-}" in
    start) start ;;
    stop)  stop; echo "stopped" ;;
    *)     echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
