"""A cold-stampede HTTP/1.1 client: N connections, a barrier, then all fire.

All connections are opened first and left idle for `settle` seconds (so nginx
has accepted them); then one tight loop writes the request on every socket
(the "barrier": nothing else runs between the sends), and one selector loop
reads the answers.

So that the client's own speed does not count, an answer's completion time is
the kernel's receive timestamp of its last bytes (SO_TIMESTAMPNS, delivered
with each recvmsg on a TCP socket), not the moment this loop got round to
reading them; the difference between the two is reported as the read lag.
All times are time.time() seconds, the clock the mock provider logs with.
"""

import selectors
import socket
import struct
import time
from collections import Counter

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)     # Linux
SCM_TIMESTAMPNS = SO_TIMESTAMPNS


class Conn:
    __slots__ = ("sock", "head", "length", "body", "status", "cache",
                 "worker", "t_send", "t_done", "t_read", "error")

    def __init__(self, sock):
        self.sock = sock
        self.head = bytearray()
        self.length = None      # Content-Length; None until the headers are in
        self.body = 0
        self.status = None
        self.cache = "-"
        self.worker = "-"
        self.t_send = None      # after send() returned
        self.t_done = None      # kernel timestamp of the answer's last bytes
        self.t_read = None      # when this loop read them
        self.error = None


def _parse_head(c, end):
    lines = bytes(c.head[:end]).decode("latin-1").split("\r\n")
    try:
        c.status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        c.error = "bad status line"
        return
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            c.length = int(value.strip())
        elif name in ("x-modelcache-status", "x-cache-status"):
            c.cache = value.strip()
        elif name == "x-worker":
            c.worker = value.strip()
    c.body = len(c.head) - end - 4


def _kernel_time(ancdata, fallback):
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
            sec, nsec = struct.unpack("qq", data[:16])
            return sec + nsec / 1e9
    return fallback


def _connect(port, n):
    conns = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setblocking(False)
            conns.append(Conn(s))
    except OSError:
        for c in conns:
            c.sock.close()
        raise
    return conns


def _read_all(conns, deadline):
    """Read every answer (or give up at deadline); fills t_done/t_read."""
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    buf = bytearray(1 << 16)
    left = len(conns)
    while left and time.time() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.time())):
            c = key.data
            try:
                got, anc, _, _ = c.sock.recvmsg_into([buf], 64)
            except OSError as e:
                c.error, got, anc = str(e), 0, []
            now = time.time()
            if got:
                if c.status is None:
                    c.head += buf[:got]
                    end = c.head.find(b"\r\n\r\n")
                    if end >= 0:
                        _parse_head(c, end)
                else:
                    c.body += got
                done = c.length is not None and c.body >= c.length
            else:
                done = True     # EOF (we sent Connection: close)
                if c.status is None and c.error is None:
                    c.error = "closed before an answer"
            if done:
                c.t_read = now
                c.t_done = _kernel_time(anc, now)
                sel.unregister(c.sock)
                c.sock.close()
                left -= 1
    for c in conns:
        if c.t_done is None:
            c.error = c.error or "timeout"
            sel.unregister(c.sock)
            c.sock.close()
    sel.close()


def stampede(port, headers, n, settle=0.3, timeout=15.0, path="/v1/models"):
    """Fire n GETs at once; per-client results and timings (a dict)."""
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (path, port)
           + "".join("%s: %s\r\n" % kv for kv in headers.items())
           + "Connection: close\r\n\r\n").encode()

    t = time.time()
    conns = _connect(port, n)
    connect_ms = (time.time() - t) * 1000
    time.sleep(settle)

    # the barrier: every request goes out in one tight loop
    cpu = time.process_time()
    t_fire = time.time()
    for c in conns:
        if c.sock.send(req) != len(req):
            c.error = "short send"
        c.t_send = time.time()

    _read_all(conns, t_fire + timeout)
    cpu_ms = (time.process_time() - cpu) * 1000

    ok = [c for c in conns if c.t_done is not None and c.error is None]
    return {
        "latencies_ms": [(c.t_done - c.t_send) * 1000 for c in ok],
        "statuses": Counter(c.status for c in ok),
        "cache": Counter(c.cache for c in ok),
        "workers": Counter(c.worker for c in ok),
        "errors": Counter(c.error for c in conns if c.error),
        "connect_ms": connect_ms,
        "send_spread_ms": (conns[-1].t_send - t_fire) * 1000,
        # how late the client read an answer after the kernel had it
        "read_lag_ms": max(((c.t_read - c.t_done) * 1000 for c in ok),
                           default=None),
        # the client's CPU time from the fire to the last answer
        "client_cpu_ms": cpu_ms,
        "fire": t_fire,
        "last_done": max((c.t_done for c in ok), default=None),
    }
