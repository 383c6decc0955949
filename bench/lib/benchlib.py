"""Shared plumbing for bench/stampede and bench/expiry (python3 stdlib only).

One Bench object owns a temp prefix dir, free loopback ports, two mock
providers (one per contender, so their fetch counts are separable) and one
nginx (master + 2 workers) serving both contenders on two server ports:

  A  modelcache   127.0.0.1:port_a  -> internal /_p/ -> mock A
  B  proxy_cache  127.0.0.1:port_b  -> proxy_pass    -> mock B

Everything it starts is stopped by pid in stop(); setup problems raise
SetupError, which the scripts turn into exit status 2.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_NGINX = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
DEFAULT_MODULE = os.environ.get(
    "MODELCACHE_MODULE",
    os.path.join(REPO, "build", "ngx_http_modelcache_module.so"))
DEFAULT_FIXTURES = os.environ.get(
    "MODELCACHE_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))
MOCK = os.path.join(REPO, "t", "mock", "provider.py")

SWR_DIRECTIVE = "modelcache_stale_while_revalidate"


class SetupError(Exception):
    """The bench could not be set up; nothing was measured."""


# ---- small helpers ----------------------------------------------------------

def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (bound, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a list; None if empty."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


def fmt_ms(x, width=0):
    s = "-" if x is None else "%.1f" % x
    return s.rjust(width) if width else s


def table(headers, rows, align=None):
    """A plain text table: a header row, a rule, the rows."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    align = align or ["<"] + [">"] * (len(headers) - 1)

    def line(r):
        return "  ".join(c.ljust(w) if a == "<" else c.rjust(w)
                         for c, w, a in zip(r, widths, align)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def http_get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_until(deadline, probe, step=0.05):
    while time.monotonic() < deadline:
        v = probe()
        if v:
            return v
        time.sleep(step)
    return None


# ---- the bench environment --------------------------------------------------

class Bench:
    def __init__(self, args, name):
        self.nginx = args.nginx
        self.module = os.path.abspath(args.module)
        self.fixtures = os.path.abspath(args.fixtures)
        self.delay_ms = args.delay_ms
        self.keep = args.keep
        for path, what in ((self.nginx, "nginx binary"),
                           (self.module, "module (run make first)"),
                           (MOCK, "mock provider")):
            if not os.path.exists(path):
                raise SetupError("%s not found: %s" % (what, path))
        if not os.path.isdir(self.fixtures):
            raise SetupError("fixtures dir not found: %s" % self.fixtures)
        self.dir = tempfile.mkdtemp(prefix="mc-bench-%s-" % name)
        os.chmod(self.dir, 0o755)    # workers run as nobody
        # load a private copy: a `make` during the run rewrites build/*.so in
        # place, and workers that have it mapped die of SIGBUS/SIGSEGV
        self.module_src = self.module
        self.module_mtime = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(self.module)))
        self.module = self.path(os.path.basename(self.module))
        shutil.copy2(self.module_src, self.module)
        (self.port_a, self.port_b,
         self.mock_a, self.mock_b) = free_ports(4)
        self.procs = {}              # name -> Popen, all stopped in stop()
        self.swr = False
        self.conf = None

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- mock providers --

    def start_mocks(self):
        for name, port in (("mock_a", self.mock_a), ("mock_b", self.mock_b)):
            log = open(self.path(name + ".log"), "wb")
            self.procs[name] = subprocess.Popen(
                [sys.executable, MOCK, "--port", str(port),
                 "--fixtures", self.fixtures, "--delay-ms", str(self.delay_ms),
                 "--exit-with-parent"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
        for name, port in (("mock_a", self.mock_a), ("mock_b", self.mock_b)):
            proc = self.procs[name]

            def up():
                if proc.poll() is not None:
                    return "exited"
                try:
                    http_get_json("http://127.0.0.1:%d/__mock/stats" % port, 1)
                    return "up"
                except OSError:
                    return None
            state = wait_until(time.monotonic() + 10, up)
            if state != "up":
                raise SetupError("%s (port %d) %s; log:\n%s" % (
                    name, port, state or "did not answer in 10 s",
                    self.tail(name + ".log")))

    def mock_stats(self, which):
        port = self.mock_a if which == "A" else self.mock_b
        return http_get_json("http://127.0.0.1:%d/__mock/stats" % port, 10)

    # -- nginx --

    def conf_text(self, ttl, swr):
        """The whole nginx.conf; the A and B locations are also kept for print."""
        d = self.dir
        swr_line = ("            %s %s;\n" % (SWR_DIRECTIVE, swr)) if swr else ""
        loc_a = (
            "        location = /v1/models {\n"
            "            modelcache models;\n"
            "            modelcache_pass /_p/v1/models;\n"
            "            modelcache_ttl %s;\n"
            "%s"
            "            add_header X-Worker $pid always;\n"
            "        }\n"
            "        location /_p/ {\n"
            "            internal;\n"
            "            proxy_pass http://127.0.0.1:%d/;\n"
            "            proxy_set_header Accept-Encoding \"\";\n"
            "        }\n") % (ttl, swr_line, self.mock_a)
        loc_b = (
            "        location = /v1/models {\n"
            "            proxy_pass http://127.0.0.1:%d;\n"
            "            proxy_cache pc;\n"
            "            proxy_cache_valid 200 %s;\n"
            "            proxy_cache_lock on;\n"
            "            proxy_cache_lock_timeout 5s;\n"
            "            proxy_cache_use_stale updating error timeout;\n"
            "            proxy_cache_background_update on;\n"
            "            proxy_cache_key $uri$http_authorization;\n"
            "            add_header X-Cache-Status $upstream_cache_status always;\n"
            "            add_header X-Worker $pid always;\n"
            "        }\n") % (self.mock_b, ttl)
        text = nginx_conf_head(self.module, d) + (
            "    log_format bench '$msec $status $request_time $body_bytes_sent '\n"
            "                     'mc=$modelcache_status pc=$upstream_cache_status';\n"
            "\n"
            "    modelcache_zone zone=models:32m;\n"
            "    proxy_cache_path %(d)s/pcache levels=1:2 keys_zone=pc:32m;\n"
            "\n"
            "    server {    # A: modelcache\n"
            "        listen 127.0.0.1:%(pa)d reuseport backlog=4096;\n"
            "        access_log %(d)s/a.access.log bench;\n"
            "%(loc_a)s"
            "    }\n"
            "\n"
            "    server {    # B: proxy_cache\n"
            "        listen 127.0.0.1:%(pb)d reuseport backlog=4096;\n"
            "        access_log %(d)s/b.access.log bench;\n"
            "%(loc_b)s"
            "    }\n"
            "}\n") % {"d": d, "pa": self.port_a,
                      "pb": self.port_b, "loc_a": loc_a, "loc_b": loc_b}
        return text, loc_a, loc_b

    def nginx_t(self, text):
        """nginx -t on a config text, in a scratch prefix; (ok, output)."""
        probe = self.path("probe")
        os.makedirs(probe, exist_ok=True)
        shutil.copy2(self.module, probe)
        conf = os.path.join(probe, "nginx.conf")
        # same config, but every path under the scratch dir
        with open(conf, "w") as f:
            f.write(text.replace(self.dir + "/", probe + "/"))
        r = subprocess.run([self.nginx, "-t", "-p", probe + "/", "-c", conf,
                            "-e", os.path.join(probe, "error.log")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=30)
        return r.returncode == 0, r.stdout.decode(errors="replace")

    def configure(self, ttl, swr):
        """Write nginx.conf; SWR only if this build's nginx -t accepts it."""
        self.swr = False
        if swr:
            text, loc_a, loc_b = self.conf_text(ttl, swr)
            ok, out = self.nginx_t(text)
            if ok:
                self.swr = True
            elif ('unknown directive "%s"' % SWR_DIRECTIVE) not in out:
                raise SetupError("nginx -t failed:\n" + out)
        if not self.swr:
            text, loc_a, loc_b = self.conf_text(ttl, None)
            ok, out = self.nginx_t(text)
            if not ok:
                raise SetupError("nginx -t failed:\n" + out)
        with open(self.path("nginx.conf"), "w") as f:
            f.write(text)
        self.conf = text
        self.loc_a, self.loc_b = loc_a, loc_b

    def listen_ports(self):
        return (self.port_a, self.port_b)

    def start_nginx(self):
        log = open(self.path("nginx.stderr"), "wb")
        proc = subprocess.Popen(
            [self.nginx, "-p", self.dir + "/", "-c", self.path("nginx.conf"),
             "-e", self.path("error.log")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs["nginx"] = proc

        def up():
            if proc.poll() is not None:
                return "exited"
            if (all(port_open(p) for p in self.listen_ports())
                    and len(self.nginx_workers()) == 2):
                return "up"
            return None
        state = wait_until(time.monotonic() + 10, up)
        if state != "up":
            raise SetupError("nginx %s; error.log:\n%s%s" % (
                state or "not up with 2 workers in 10 s",
                self.tail("error.log"), self.tail("nginx.stderr")))

    def nginx_workers(self):
        """pids of our nginx master's worker processes."""
        master = self.procs["nginx"].pid
        kids = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % pid) as f:
                    stat = f.read()
            except OSError:
                continue
            # the ppid is the 2nd field after the ")" that closes the name
            if int(stat.rsplit(")", 1)[1].split()[1]) != master:
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    title = f.read()
            except OSError:
                continue
            if b"worker process" in title:     # not the cache manager/loader
                kids.append(int(pid))
        return kids

    def error_log_problems(self):
        """[alert]/[emerg]/[crit] lines and worker crashes in error.log."""
        text = self.tail("error.log", 10 ** 7)
        return [l for l in text.splitlines()
                if "[alert]" in l or "[emerg]" in l or "[crit]" in l
                or "exited on signal" in l]

    def tail(self, name, limit=3000):
        try:
            with open(self.path(name), "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-limit:].decode(errors="replace")

    def log_size(self, which):
        try:
            return os.path.getsize(self.path(which.lower() + ".access.log"))
        except OSError:
            return 0

    def read_log(self, which, offset=0):
        """Access log lines of contender A or B from byte offset on, parsed."""
        out = []
        with open(self.path(which.lower() + ".access.log"), "rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) < 6:
                    continue
                out.append({"msec": float(parts[0]), "status": parts[1],
                            "request_time": float(parts[2]),
                            "bytes": int(parts[3]),
                            "mc": parts[4][3:], "pc": parts[5][3:]})
        return out

    # -- teardown --

    def stop(self):
        """Stop what we started, by pid: nginx (QUIT, then TERM/KILL), mocks."""
        for name in sorted(self.procs, key=lambda n: n != "nginx"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            first = signal.SIGQUIT if name == "nginx" else signal.SIGTERM
            for sig, wait in ((first, 5), (signal.SIGTERM, 3),
                              (signal.SIGKILL, 3)):
                try:
                    proc.send_signal(sig)
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.dir is None:
            return
        if self.keep:
            print("kept %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def nginx_conf_head(module, d):
    """The main context and the start of http {} of every bench nginx.conf:
    master + 2 workers in the foreground, logs and temp files in d."""
    return (
        "load_module %(module)s;\n"
        "worker_processes 2;\n"
        "worker_rlimit_nofile 8192;\n"
        "daemon off;\n"
        "master_process on;\n"
        "pid %(d)s/nginx.pid;\n"
        "error_log %(d)s/error.log notice;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    client_body_temp_path %(d)s/client_body;\n"
        "    proxy_temp_path %(d)s/proxy_temp;\n"
        "    fastcgi_temp_path %(d)s/fastcgi_temp;\n"
        "    uwsgi_temp_path %(d)s/uwsgi_temp;\n"
        "    scgi_temp_path %(d)s/scgi_temp;\n"
        "    keepalive_requests 1000000;\n") % {"module": module, "d": d}


def add_common_args(p):
    p.add_argument("--delay-ms", type=int, default=300,
                   help="provider latency in ms (default 300)")
    p.add_argument("--nginx", default=DEFAULT_NGINX,
                   help="nginx binary (default $NGINX_BIN or /usr/sbin/nginx)")
    p.add_argument("--module", default=DEFAULT_MODULE,
                   help="module .so (default build/ngx_http_modelcache_module.so)")
    p.add_argument("--fixtures", default=DEFAULT_FIXTURES,
                   help="fixtures dir for the mock (default ../shared/fixtures)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir (configs, logs) and print its path")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a goal is missed")


def run_main(name, args, body):
    """Set up a Bench, run body(bench), always stop; exit 2 on setup failure."""
    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    bench = None
    try:
        bench = Bench(args, name)
        rc = body(bench)
    except (SetupError, OSError) as e:
        print("%s: setup failed: %s" % (name, e), file=sys.stderr)
        rc = 2
    finally:
        if bench is not None:
            bench.stop()
    return rc


# ---- one keep-alive connection, request by request --------------------------

class KeepAlive:
    """GETs one after another on one HTTP/1.1 connection, timed, as a
    browser would: after an answer with "Connection: close" the next GET
    opens a new connection (counted in .connections)."""

    def __init__(self, port, timeout=10):
        self.port = port
        self.timeout = timeout
        self.connections = 0
        self._connect()

    def _connect(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port),
                                             timeout=self.timeout)
        self.buf = b""
        self.closing = False
        self.connections += 1

    def get(self, headers, path="/v1/models"):
        """(status, cache status header, ms to the whole answer)."""
        req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (path, self.port)
               + "".join("%s: %s\r\n" % kv for kv in headers.items())
               + "\r\n").encode()
        t = time.monotonic()
        if self.closing:
            self.sock.close()
            self._connect()
        self.sock.sendall(req)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        length = int(fields.get("content-length", 0))
        while len(self.buf) < length:
            self._recv()
        self.buf = self.buf[length:]
        self.closing = fields.get("connection", "").lower() == "close"
        cache = fields.get("x-modelcache-status", fields.get("x-cache-status", "-"))
        return int(lines[0].split()[1]), cache, (time.monotonic() - t) * 1000

    def _recv(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise OSError("connection closed by nginx")
        self.buf += data

    def close(self):
        self.sock.close()


def parse_seconds(text):
    """nginx-style time ("2s", "500ms", "1m", "3") in seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)
