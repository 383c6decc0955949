"""Plumbing for bench/hits (python3 stdlib only).

One HitsEnv owns a temp prefix dir, free loopback ports, one mock provider
(serving the bench bodies written to the temp dir) and one nginx (master +
2 workers) with one server per contender and encoding:

  A   modelcache hit       port a      A-gz  the list locations alone, no
                                             gzip directives (the module
                                             answers from its stored gzip copy)
  B   static file (limit)  port b      B-gz  the same + gzip_static on
  C   proxy_cache hit      port c      C-gz  the same + gzip on
  S   the per-entry zone   port s      (modelcache_scope $arg_s; stats of
                                        both zones)

A also has, per body, a lookup location (/lk/<body>/<id>, modelcache_lookup)
and a filter location (/f/<body>.json, modelcache_filter on) over the same
pass URI as its list location, so all three share one entry.

Everything it starts is stopped by pid in stop(); setup problems raise
benchlib.SetupError, which bench/hits turns into exit status 2.
"""

import gzip
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import benchlib as bl

# name -> URI of the bench bodies (the same on every contender)
BODY_NAMES = ("4k", "64k", "1m")
CONTENDERS = ("A", "B", "C")
NAMES = {"A": "modelcache", "B": "static file", "C": "proxy_cache"}

# table 3: a plain list hit, a lookup and a filter variant, all on server A
VARIANTS = ("A", "A-lookup", "A-filter")
VARIANT_NAMES = {"A": "A list hit", "A-lookup": "A-lookup",
                 "A-filter": "A-filter"}
# the fixed filter variant: "gpt" is in several ids of every body
FILTER_Q = "gpt"
FILTER_ARGS = "q=%s&sort=-created&limit=5" % FILTER_Q
FILTER_LIMIT = 5

# the perentry zone: 1,000 entries of the 4 KB body and 1,000 of the 64 KB
# one, each with its gzip copy, take about 8 MB + 80 MB
PERENTRY_ZONE = "256m"


def uri(body):
    return "/%s.json" % body


def lookup_id(data):
    """The id of the model in the middle of the body's list."""
    models = json.loads(data)["data"]
    return models[len(models) // 2]["id"]


def lookup_uri(body, model_id):
    return "/lk/%s/%s" % (body, urllib.parse.quote(model_id, safe="/:"))


def filter_uri(body):
    return "/f/%s.json?%s" % (body, FILTER_ARGS)


def variant_uri(which, body, data):
    if which == "A-lookup":
        return lookup_uri(body, lookup_id(data))
    if which == "A-filter":
        return filter_uri(body)
    return uri(body)


def filter_expected(data):
    """What FILTER_ARGS must answer, computed here: ids containing FILTER_Q
    (ASCII case-insensitive), by "created" descending (stable; models
    without an integer "created" last), the first FILTER_LIMIT; and how many
    matched the q before the limit."""
    models = json.loads(data)["data"]
    hit = [m for m in models if FILTER_Q.lower() in str(m.get("id", "")).lower()]

    def dated(m):
        c = m.get("created")
        return isinstance(c, int) and not isinstance(c, bool)
    ordered = (sorted((m for m in hit if dated(m)), key=lambda m: -m["created"])
               + [m for m in hit if not dated(m)])
    return ordered[:FILTER_LIMIT], len(hit)


def lookup_expected(data):
    """The model object a lookup of lookup_id() must answer (with
    duplicate ids the first wins), JSON-decoded."""
    want = lookup_id(data)
    return next(m for m in json.loads(data)["data"] if m.get("id") == want)


def sha(data):
    return hashlib.sha256(data).hexdigest()


# ---- the bodies -------------------------------------------------------------

def build_bodies(fixtures):
    """{name: bytes}: ~4 KB and ~64 KB prefixes of real model lists, and the
    ~1 MB OpenRouter list as is.  Each keeps its fixture's formatting."""
    def read(name):
        path = os.path.join(fixtures, name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise bl.SetupError("fixture %s: %s" % (path, e.strerror))

    def largest_prefix(models, dump, limit):
        """The dump of the longest prefix of models that fits in limit bytes."""
        best = None
        for n in range(1, len(models) + 1):
            data = dump(models[:n])
            if len(data) > limit:
                break
            best = data
        if best is None:
            raise bl.SetupError("not even one model fits in %d bytes" % limit)
        return best

    openai = json.loads(read("openai_models.json"))
    openrouter_raw = read("openrouter_models.json")
    openrouter = json.loads(openrouter_raw)

    # openai_models.json is indent=2 with a final newline
    small = largest_prefix(
        openai["data"],
        lambda m: (json.dumps({"object": openai.get("object", "list"),
                               "data": m}, indent=2) + "\n").encode(),
        4096)
    # openrouter_models.json is compact UTF-8 without a final newline
    medium = largest_prefix(
        openrouter["data"],
        lambda m: json.dumps({"data": m}, separators=(",", ":"),
                             ensure_ascii=False).encode(),
        65536)
    return {"4k": small, "64k": medium, "1m": openrouter_raw}


def count_models(data):
    return len(json.loads(data)["data"])


# ---- HTTP -------------------------------------------------------------------

def fetch(port, path, headers=None, timeout=10):
    """One GET on a fresh connection: (status, {lower name: value}, body as
    sent, i.e. still gzip-encoded if it was, size of the response head)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        fields = {k.lower(): v for k, v in r.getheaders()}
        head = len("HTTP/1.1 %d %s\r\n" % (r.status, r.reason)) + 2 + sum(
            len(k) + len(v) + 4 for k, v in r.getheaders())
        return r.status, fields, body, head
    except (OSError, http.client.HTTPException) as e:
        raise bl.SetupError("GET 127.0.0.1:%d%s failed: %s" % (port, path, e))
    finally:
        conn.close()


def parse_wrk(out):
    """requests/s, p50/p99/max latency in ms, non-2xx/3xx, socket errors."""
    def ms(text):
        m = re.match(r"([\d.]+)(us|ms|s|m|h)$", text)
        if not m:
            return None
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0,
                                    "m": 60000.0, "h": 3600000.0}[m.group(2)]
    res = {}
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    for pct in ("50", "99"):
        m = re.search(r"^\s+%s(?:\.0+)?%%\s+(\S+)" % pct, out, re.M)
        res["p" + pct] = ms(m.group(1)) if m else None
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    res["max"] = ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                  r"timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return res


def run_wrk(wrk, port, path, conns, seconds, headers=()):
    cmd = [wrk, "-t1", "-c%d" % conns, "-d%ds" % seconds, "--latency",
           "--timeout", "10s"]
    for h in headers:
        cmd += ["-H", h]
    cmd.append("http://127.0.0.1:%d%s" % (port, path))
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise bl.SetupError("wrk did not finish in %d s" % (seconds + 30))
    out = r.stdout.decode(errors="replace")
    res = parse_wrk(out)
    if r.returncode != 0 or res["rps"] is None or res["p99"] is None:
        raise bl.SetupError("wrk failed (exit %d):\n%s" % (r.returncode, out))
    res["out"] = out
    return res


# ---- the machine ------------------------------------------------------------

def machine_line(nginx, wrk):
    cpu = "?"
    mem = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = "%.0f GiB" % (int(line.split()[1]) / 1048576.0)
                    break
    except OSError:
        pass

    def version(cmd):
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=10)
            return r.stdout.decode(errors="replace").splitlines()[0].strip()
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "?"
    load = " ".join("%.2f" % x for x in os.getloadavg())
    return ("machine: %s, %d cores, %s, Linux %s; %s; %s; %s; load avg %s"
            % (cpu, os.cpu_count() or 0, mem, platform.release(),
               version([nginx, "-v"]), version([wrk, "-v"]).split(" Copyright")[0],
               time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), load))


def nginx_has_gzip_static(nginx):
    try:
        r = subprocess.run([nginx, "-V"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise bl.SetupError("%s -V: %s" % (nginx, e))
    return b"--with-http_gzip_static_module" in r.stdout


# ---- the environment --------------------------------------------------------

class HitsEnv:
    SERVERS = ("A", "B", "C", "A-gz", "B-gz", "C-gz", "S")

    def __init__(self, args):
        self.nginx = args.nginx
        self.module_src = os.path.abspath(args.module)
        self.fixtures = os.path.abspath(args.fixtures)
        self.keep = args.keep
        self.gzip_level = args.gzip_level
        self.procs = {}
        self.dir = None
        for path, what in ((self.nginx, "nginx binary"),
                           (self.module_src, "module (run make first)"),
                           (bl.MOCK, "mock provider")):
            if not os.path.exists(path):
                raise bl.SetupError("%s not found: %s" % (what, path))
        if not os.path.isdir(self.fixtures):
            raise bl.SetupError("fixtures dir not found: %s" % self.fixtures)
        self.dir = tempfile.mkdtemp(prefix="mc-bench-hits-")
        os.chmod(self.dir, 0o755)            # workers run as nobody
        self.module_mtime = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(self.module_src)))
        # a private copy: a `make` during the run must not pull the .so
        # from under the workers
        self.module = self.path(os.path.basename(self.module_src))
        shutil.copy2(self.module_src, self.module)
        ports = bl.free_ports(len(self.SERVERS) + 1)
        self.port = dict(zip(self.SERVERS, ports))
        self.mock_port = ports[-1]
        self.bodies = {}
        self.conf = None
        self.blocks = {}
        self.blocks_shown = {}

    def path(self, *names):
        return os.path.join(self.dir, *names)

    # -- bodies on disk: mock fixtures, static root, .gz copies --

    def write_bodies(self, bodies):
        self.bodies = bodies
        for sub in ("bodies", "www"):
            os.makedirs(self.path(sub))
            os.chmod(self.path(sub), 0o755)
        for name, data in bodies.items():
            for target in (self.path("bodies", name + ".json"),
                           self.path("www", name + ".json")):
                with open(target, "wb") as f:
                    f.write(data)
                os.chmod(target, 0o644)
            gz = self.path("www", name + ".json.gz")
            with open(gz, "wb") as f:
                f.write(gzip.compress(data, compresslevel=6, mtime=0))
            os.chmod(gz, 0o644)

    # -- the mock provider --

    def start_mock(self):
        log = open(self.path("mock.log"), "wb")
        self.procs["mock"] = subprocess.Popen(
            [sys.executable, bl.MOCK, "--port", str(self.mock_port),
             "--fixtures", self.path("bodies"), "--delay-ms", "0",
             "--exit-with-parent"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        proc = self.procs["mock"]

        def up():
            if proc.poll() is not None:
                return "exited"
            try:
                bl.http_get_json("http://127.0.0.1:%d/__mock/stats"
                                 % self.mock_port, 1)
                return "up"
            except OSError:
                return None
        state = bl.wait_until(time.monotonic() + 10, up)
        if state != "up":
            raise bl.SetupError("mock provider (port %d) %s; log:\n%s" % (
                self.mock_port, state or "did not answer in 10 s",
                self.tail("mock.log")))
        for name in self.bodies:
            spec = json.dumps({"path": uri(name),
                               "fixture": name + ".json"}).encode()
            req = urllib.request.Request(
                "http://127.0.0.1:%d/__mock/route" % self.mock_port, data=spec,
                headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    if json.loads(r.read()).get("ok") is not True:
                        raise bl.SetupError("mock refused route %s" % name)
            except OSError as e:
                raise bl.SetupError("mock route %s: %s" % (name, e))

    # -- nginx --

    def server_blocks(self):
        """{server name: its server block}; also what the header prints."""
        mock = "http://127.0.0.1:%d" % self.mock_port
        gz_level = ("" if self.gzip_level == 1
                    else "        gzip_comp_level %d;\n" % self.gzip_level)
        gzip_on = ("        gzip on;\n"
                   "        gzip_types application/json;\n"
                   "        gzip_min_length 0;\n" + gz_level)
        internal = ("        location /_p/ {\n"
                    "            internal;\n"
                    "            proxy_pass %s/;\n"
                    "            proxy_set_header Accept-Encoding \"\";\n"
                    "        }\n") % mock

        def variants(n):
            return ("        location ~ ^/lk/%s/(?<id>.+)$ {\n"
                    "            modelcache models;\n"
                    "            modelcache_pass /_p%s;\n"
                    "            modelcache_ttl 1h;\n"
                    "            modelcache_lookup $id;\n"
                    "        }\n"
                    "        location = /f%s {\n"
                    "            modelcache models;\n"
                    "            modelcache_pass /_p%s;\n"
                    "            modelcache_ttl 1h;\n"
                    "            modelcache_filter on;\n"
                    "        }\n" % (n, uri(n), uri(n), uri(n)))

        def a(with_variants, shown=False):
            locs = "".join(
                "        location = %s {\n"
                "            modelcache models;\n"
                "            modelcache_pass /_p%s;\n"
                "            modelcache_ttl 1h;\n"
                "        }\n" % (uri(n), uri(n)) for n in BODY_NAMES)
            if with_variants and shown:
                locs += variants(BODY_NAMES[0]) + (
                    "        # ... and the same two for %s\n"
                    % ", ".join(BODY_NAMES[1:]))
            elif with_variants:
                locs += "".join(variants(n) for n in BODY_NAMES)
            return locs + internal

        def b(extra):
            return ("        root %s;\n"
                    "        default_type application/json;\n"
                    "        sendfile on;\n"
                    "        tcp_nopush on;\n"
                    "        open_file_cache max=100 inactive=1h;\n"
                    "        open_file_cache_valid 1h;\n"
                    "%s"
                    "        location / { }\n") % (self.path("www"), extra)

        def c(extra):
            return ("        sendfile on;        # as in Debian's nginx.conf\n"
                    "        tcp_nopush on;\n"
                    "%s"
                    "        location / {\n"
                    "            proxy_pass %s;\n"
                    "            proxy_cache pc;\n"
                    "            proxy_cache_valid 200 1h;\n"
                    "            add_header X-Cache-Status $upstream_cache_status always;\n"
                    "        }\n") % (extra, mock)

        s = ("        location = /e {\n"
             "            modelcache perentry;\n"
             "            modelcache_pass /_p%s;\n"
             "            modelcache_scope $arg_s;\n"
             "            modelcache_ttl 1h;\n"
             "        }\n"
             "        location = /e64 {\n"
             "            modelcache perentry;\n"
             "            modelcache_pass /_p%s;\n"
             "            modelcache_scope $arg_s;\n"
             "            modelcache_ttl 1h;\n"
             "        }\n"
             "        location = /stats {\n"
             "            modelcache_stats perentry;\n"
             "        }\n"
             "        location = /stats-models {\n"
             "            modelcache_stats models;\n"
             "        }\n" % (uri("4k"), uri("64k"))) + internal
        self.blocks_shown = {"A": a(True, shown=True)}
        return {"A": a(True), "B": b(""), "C": c(""),
                "A-gz": a(False), "B-gz": b("        gzip_static on;\n"),
                "C-gz": c(gzip_on), "S": s}

    def configure(self):
        self.blocks = self.server_blocks()
        d = self.dir
        servers = "".join(
            "\n    server {    # %s\n"
            "        listen 127.0.0.1:%d reuseport backlog=4096;\n"
            "%s"
            "    }\n" % (name, self.port[name], self.blocks[name])
            for name in self.SERVERS)
        text = bl.nginx_conf_head(self.module, d) + (
            "    access_log off;\n"
            "\n"
            "    modelcache_zone zone=models:32m;\n"
            "    modelcache_zone zone=perentry:%(perentry)s;\n"
            "    proxy_cache_path %(d)s/pcache levels=1:2 keys_zone=pc:10m;\n"
            "%(servers)s"
            "}\n") % {"d": d, "servers": servers, "perentry": PERENTRY_ZONE}
        conf = self.path("nginx.conf")
        with open(conf, "w") as f:
            f.write(text)
        self.conf = text
        r = subprocess.run([self.nginx, "-t", "-p", d + "/", "-c", conf,
                            "-e", self.path("error.log")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=30)
        if r.returncode != 0:
            raise bl.SetupError("nginx -t failed:\n"
                                + r.stdout.decode(errors="replace"))

    def listen_ports(self):
        return self.port.values()

    # benchlib's Bench has the same procs["nginx"] and path(): its helpers
    start_nginx = bl.Bench.start_nginx
    nginx_workers = bl.Bench.nginx_workers
    error_log_problems = bl.Bench.error_log_problems
    tail = bl.Bench.tail

    def stats(self, zone="perentry"):
        """The JSON stats of the perentry zone, or of the models zone."""
        path = "/stats" if zone == "perentry" else "/stats-models"
        try:
            return bl.http_get_json("http://127.0.0.1:%d%s"
                                    % (self.port["S"], path), 10)
        except (OSError, ValueError) as e:
            raise bl.SetupError("stats location: %s" % e)

    # -- teardown --

    stop = bl.Bench.stop
