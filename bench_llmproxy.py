#!/usr/bin/env python3
"""Benchmark llmproxy against calling a fast fake upstream directly (standard library only).

    python3 bench_llmproxy.py                  # full run (about a minute), prints one table
    python3 bench_llmproxy.py --quick          # 1 s per measurement
    python3 bench_llmproxy.py --json out.json  # also write the figures as JSON
    python3 bench_llmproxy.py --workers 2      # the proxy with two worker processes
    python3 bench_llmproxy.py --soak 60        # mixed soak: nonce-checked answers, hang-ups, hostile
                                               # requests, a misbehaving upstream; exit 1 on a wrong answer

The fake upstream speaks OpenAI chat completions and Anthropic messages, JSON or SSE
(--events events per stream, --pace-ms between them). The proxy runs in its own process
pinned to CPU 0 where os.sched_setaffinity exists; the upstream and this load generator
share CPU 1. Every scenario is measured against the upstream called directly in the
same run; the translated ones (an Anthropic client on the OpenAI upstream) against the
direct OpenAI call, which does the same upstream work.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "bench-key-0123456789abcdef"


# fake upstream ###############################################################

def openai_reply() -> bytes:
    return json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, this is "
                                    "a benchmark reply of moderate length."}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}).encode()


def anthropic_reply() -> bytes:
    return json.dumps({"id": "msg_bench", "type": "message", "role": "assistant", "model": "bench",
                       "content": [{"type": "text", "text": "Hello there, this is a benchmark reply of moderate "
                                    "length."}], "stop_reason": "end_turn", "stop_sequence": None,
                       "usage": {"input_tokens": 12, "output_tokens": 9}}).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def openai_events(n: int) -> list:
    out = []
    for i in range(n):
        c = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "bench",
             "choices": [{"index": 0, "delta": {"content": "tok%d " % i}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n")
    out.append(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench","choices":'
               b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    out.append(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d}}\n\n' % n)
    out.append(b"data: [DONE]\n\n")
    return out


def anthropic_events(n: int) -> list:
    def ev(name, obj):
        return b"event: " + name.encode() + b"\ndata: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    out = [ev("message_start", {"type": "message_start", "message": {"id": "msg_b", "type": "message", "role":
                                "assistant", "model": "bench", "content": [], "usage": {"input_tokens": 12,
                                                                                       "output_tokens": 1}}}),
           ev("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})]
    for i in range(n):
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": "tok%d " % i}}))
    out += [ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": {"output_tokens": n}}),
            ev("message_stop", {"type": "message_stop"})]
    return out


class UpstreamProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server: keep-alive, Content-Length bodies, canned replies."""

    def __init__(self, replies, pace):
        self.buf = b""
        self.replies = replies
        self.pace = pace

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = re.search(rb"(?i)content-length: *(\d+)", self.buf[:end])
            length = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + length:
                return
            head, body = self.buf[:end], self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            fmt = "anthropic" if b" /v1/messages" in head[:40] else "openai"
            stream = b'"stream":true' in body or b'"stream": true' in body
            if stream and self.pace:
                asyncio.ensure_future(self.paced(self.replies[(fmt, "events")]))
            else:
                self.transport.write(self.replies[(fmt, stream)])

    async def paced(self, events):
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for ev in events:
            await asyncio.sleep(self.pace)
            if self.transport.is_closing():
                return
            self.transport.write(chunk(ev))
        self.transport.write(b"0\r\n\r\n")


def upstream_replies(events: int) -> dict:
    sse_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    replies = {}
    for fmt, body, evs in (("openai", openai_reply(), openai_events(events)),
                           ("anthropic", anthropic_reply(), anthropic_events(events))):
        replies[(fmt, False)] = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))
        replies[(fmt, True)] = sse_head + b"".join(chunk(e) for e in evs) + b"0\r\n\r\n"
        replies[(fmt, "events")] = evs
    return replies


def run_upstream(port: int, events: int, pace_ms: float):
    replies = upstream_replies(events)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: UpstreamProtocol(replies, pace_ms / 1000.0), "127.0.0.1", port,
                                          backlog=2048)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


# load generator ##############################################################

class Result:
    def __init__(self):
        self.latencies = []
        self.ttfb = []
        self.events = 0
        self.errors = 0
        self.elapsed = 0.0


def request_bytes(path: str, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: b\r\nauthorization: Bearer %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), KEY.encode(), len(body), body))


async def read_reply(reader, stream: bool, t0: float, result: Result):
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        result.errors += 1
    if stream:
        first = None
        count = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if first is None:
                first = time.perf_counter()
            if size == 0:
                break
            count += data.count(b"data: ")
        result.ttfb.append(first - t0)
        result.events += count
    else:
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(m.group(1)))


async def one_connection(port, req, stream, deadline, result):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(req)
            await read_reply(reader, stream, t0, result)
            result.latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


def make_request(client: str, stream: bool) -> bytes:
    if client == "anthropic":
        body = {"model": "bench", "max_tokens": 256, "stream": stream,
                "messages": [{"role": "user", "content": "Say hello"}]}
        return request_bytes("/v1/messages", json.dumps(body).encode())
    body = {"model": "bench", "stream": stream, "messages": [{"role": "user", "content": "Say hello"}]}
    return request_bytes("/v1/chat/completions", json.dumps(body).encode())


async def load(port, conns, seconds, stream, client="openai"):
    req = make_request(client, stream)
    result = Result()
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection(port, req, stream, deadline, result) for _ in range(conns)))
    result.elapsed = time.perf_counter() - t0
    return result


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


# orchestration ###############################################################

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pin(cpu):
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        return lambda: os.sched_setaffinity(0, {cpu})
    return None


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.005)
    raise RuntimeError("port %d never opened" % port)


def first_response_time(cmd, env, port, timeout=10.0) -> float:
    """Seconds from spawning the proxy to its first answered request."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s = socket.create_connection(("127.0.0.1", port), 0.5)
                s.sendall(b"GET /health HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    s.close()
                    return time.perf_counter() - t0
                s.close()
            except OSError:
                time.sleep(0.002)
        raise RuntimeError("no response within %.0f s" % timeout)
    finally:
        proc.terminate()
        proc.wait(10)


def rss_mb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def proxy_cmd(cfg_path, port, data_dir, workers):
    return [sys.executable, os.path.join(HERE, "llmproxy.py"), "--config", cfg_path, "--port", str(port),
            "--data-dir", data_dir, "--workers", str(workers)]


GUARDRAILS = {"tool_repair": {"enabled": True}, "json_repair": {"enabled": True},   # --guardrails: every stage
              "loop_detection": {"enabled": True}, "dangerous_commands": {"enabled": True},
              "redact": {"enabled": True},
              "rewrite": [{"target": "reply", "action": "replace", "match": "zzz", "with": "z"}]}

SCENARIOS = [  # (name, client format, stream, connections)
    ("chat", "openai", False, 1), ("chat", "openai", False, 16), ("chat", "openai", False, 64),
    ("stream", "openai", True, 1), ("stream", "openai", True, 32),
    ("an-oc", "anthropic", False, 16), ("an-oc stream", "anthropic", True, 32),
]


# the reference: a bare relay ##################################################
# The floor of this stack: asyncio streams, keep-alive on both sides, one pooled upstream
# connection per client connection, Content-Length and chunked bodies relayed as they come.
# No parsing beyond framing, no auth, no routing. llmproxy's figures are also given as a
# ratio to it, so they mean the same on any machine.

async def _relay_body(reader, writer, headers: bytes):
    low = headers.lower()
    if b"transfer-encoding: chunked" in low:
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            writer.write(line + data)
            if size == 0:
                return
    m = re.search(rb"content-length:\s*(\d+)", low)
    if m:
        writer.write(await reader.readexactly(int(m.group(1))))


async def _relay_conn(cr, cw, up_port):
    ur = uw = None
    try:
        while True:
            head = await cr.readuntil(b"\r\n\r\n")
            if ur is None:
                ur, uw = await asyncio.open_connection("127.0.0.1", up_port)
            uw.write(head)
            await _relay_body(cr, uw, head)
            rhead = await ur.readuntil(b"\r\n\r\n")
            cw.write(rhead)
            await _relay_body(ur, cw, rhead)
            await cw.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        cw.close()
        if uw is not None:
            uw.close()


def run_relay(port: int, up_port: int):
    async def main():
        server = await asyncio.start_server(lambda r, w: _relay_conn(r, w, up_port), "127.0.0.1", port)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


# instruction counts ###########################################################
# Wall and CPU figures move with the machine's other load (a shared VM swings 30-40 %).
# --instructions counts what the CPU executes instead: client, fake upstream and the target
# run in one process under valgrind's callgrind; a run of N requests minus a run of none is
# the instructions per request, the same on every run of the same code and interpreter.

def run_inproc(mode: str, client: str, stream: bool, n: int, guardrails: bool):
    """N requests through one target, all in this process (what callgrind counts)."""
    replies = upstream_replies(100)

    async def one(port, req, count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        result = Result()
        for _ in range(count):
            writer.write(req)
            await read_reply(reader, stream, time.perf_counter(), result)
        writer.close()

    async def main():
        loop = asyncio.get_running_loop()
        up = await loop.create_server(lambda: UpstreamProtocol(replies, 0), "127.0.0.1", 0)
        up_port = up.sockets[0].getsockname()[1]
        tmp = tempfile.mkdtemp()
        cfg = {"env_providers": False, "log_level": "warning",
               "providers": {"up": {"base_url": "http://127.0.0.1:%d/v1" % up_port}},
               "routing": {"default": "up"}, "auth": {"keys": [KEY]}}
        if guardrails:
            cfg["guardrails"] = GUARDRAILS
        path = os.path.join(tmp, "c.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        if mode == "proxy":
            sys.path.insert(0, HERE)
            import llmproxy as lp
            app = lp.App(lp.load_config(path, {}, {"data_dir": os.path.join(tmp, "data")}))
            server = lp.HTTPServer(app)
            await server.start("127.0.0.1", 0)
            port = server.port
        elif mode == "relay":
            relay = await asyncio.start_server(lambda r, w: _relay_conn(r, w, up_port), "127.0.0.1", 0)
            port = relay.sockets[0].getsockname()[1]
        else:
            port = up_port
        req = make_request(client, stream)
        await asyncio.gather(*(one(port, req, 25) for _ in range(4)))          # warm: pools, caches
        if n:
            await asyncio.gather(*(one(port, req, n // 4) for _ in range(4)))
    asyncio.run(main())


def count_instructions(mode, client, stream, n, guardrails) -> float:
    def collected(count):
        out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                              __file__, "_inproc", mode, client, "1" if stream else "0", str(count),
                              "1" if guardrails else "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, LLMPROXY_AS_MODULE="1"))
        m = re.search(rb"Collected : (\d+)", out.stderr)
        if not m:
            raise SystemExit("valgrind failed: %s" % out.stderr[-400:].decode("utf-8", "replace"))
        return int(m.group(1))
    return (collected(n) - collected(0)) / n


def instructions_table(guardrails: bool):
    """Instructions per request (per stream of 100 events) for each target, and what each
    adds to calling the fake upstream directly, as a ratio to what the bare relay adds."""
    import concurrent.futures
    cells = [("chat", "openai", False, 1000), ("stream", "openai", True, 200), ("an-oc", "anthropic", False, 1000),
             ("an-oc stream", "anthropic", True, 200)]
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, (os.cpu_count() or 1))) as pool:
        for label, client, stream, n in cells:
            for mode in ("direct", "relay", "proxy"):
                if mode != "proxy" and client == "anthropic":
                    continue              # translated: measured against the OpenAI calls, the same upstream work
                jobs[(label, mode)] = pool.submit(count_instructions, mode, client, stream, n, guardrails)
    got = {k: f.result() for k, f in jobs.items()}
    print("instructions/request   direct      relay      proxy   relay adds   proxy adds   proxy/relay added")
    figures = {}
    for label, client, stream, n in cells:
        base = "stream" if stream else "chat"
        d, r, x = got[(base, "direct")], got[(base, "relay")], got[(label, "proxy")]
        print("%-18s %10.0f %10.0f %10.0f %12.0f %12.0f %12.2f" % (label, d, r, x, r - d, x - d, (x - d) / (r - d)))
        figures[label.replace(" ", "_")] = {"direct": round(d), "relay": round(r), "proxy": round(x),
                                            "ratio_added": round((x - d) / (r - d), 2)}
    return figures


def cpu_s(pid) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), 0 elsewhere."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


async def measured(pid, port, conns, seconds, stream, client="openai"):
    """A load run and the CPU the serving process spent on it, in microseconds a request."""
    before = cpu_s(pid)
    result = await load(port, conns, seconds, stream, client)
    n = max(1, len(result.latencies))
    return result, round((cpu_s(pid) - before) / n * 1e6, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per measurement instead of 3")
    ap.add_argument("--events", type=int, default=100, help="events per streamed reply")
    ap.add_argument("--streams", type=int, default=500, help="open streams for the RSS measurement (0: skip)")
    ap.add_argument("--json", metavar="FILE", help="write the figures here too")
    ap.add_argument("--workers", type=int, default=1, help="proxy worker processes (pinning is then off)")
    ap.add_argument("--only", default="", help="comma-separated scenario keys, e.g. chat_c16,stream_c32")
    ap.add_argument("--guardrails", action="store_true",
                    help="run the proxy with every guardrail stage on (repair, loops, dangerous commands, "
                         "redaction, a reply rewrite), to price the pipeline")
    ap.add_argument("--profile", metavar="FILE", help="run the proxy under cProfile and write its profile here "
                    "(pstats format; read it with python3 -m pstats FILE)")
    ap.add_argument("--no-relay", action="store_true", help="skip the bare reference relay")
    ap.add_argument("--redis", metavar="URL", help="run the proxy with its shared state on this Redis "
                    "(redis://127.0.0.1:PORT/0), to price shared mode against local state")
    ap.add_argument("--rpm", type=int, default=0, help="a per-key request limit (exact across hosts on Redis)")
    ap.add_argument("--soak", type=float, metavar="SECONDS",
                    help="instead of the benchmark: a mixed soak (checked answers, hang-ups, hostile requests, a "
                         "misbehaving upstream) for this long; exits 1 on any wrong answer")
    ap.add_argument("--soak-clients", type=int, default=24, help="concurrent soak client tasks")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the soak")
    ap.add_argument("--strict", action="store_true",
                    help="soak: also exit 1 on hostile deviations, good-route errors, lost stream errors or "
                         "proxy tracebacks")
    ap.add_argument("--instructions", action="store_true",
                    help="instead of the benchmark: instructions per request (valgrind callgrind, client, upstream "
                         "and target in one process), which no other load on the machine moves; a few minutes")
    args = ap.parse_args()
    if args.instructions:
        figures = instructions_table(args.guardrails)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)
        return
    if args.soak:
        sys.exit(soak(args))
    seconds = 1.0 if args.quick else 3.0
    up_port, slow_port, px_port = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp()
    cfg = {"env_providers": False, "log_level": "warning",
           "providers": {"up": {"base_url": "http://127.0.0.1:%d/v1" % up_port},
                         "slow": {"base_url": "http://127.0.0.1:%d/v1" % slow_port}},
           "routing": {"default": "up", "aliases": {"slow": "slow:bench"}}}
    if args.guardrails:
        cfg["guardrails"] = GUARDRAILS
    if args.redis:
        cfg["shared"] = {"redis": args.redis}
    if args.rpm:
        cfg["limits"] = {"client_rpm": args.rpm}
    cfg_path = os.path.join(tmp, "bench.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, LLMPROXY_API_KEYS=KEY, LLMPROXY_ADMIN_KEYS=KEY + "-admin")
    pinning = args.workers == 1
    ups = [subprocess.Popen([sys.executable, __file__, "_upstream", str(up_port), str(args.events), "0"],
                            preexec_fn=pin(1)),
           subprocess.Popen([sys.executable, __file__, "_upstream", str(slow_port), str(args.events), "40"],
                            preexec_fn=pin(1))]
    figures = {}
    rows = []
    try:
        wait_port(up_port)
        wait_port(slow_port)
        start_port = free_port()
        figures["startup_to_first_response_s"] = round(first_response_time(
            proxy_cmd(cfg_path, start_port, tmp, 1), env, start_port), 3)
        cmd = proxy_cmd(cfg_path, px_port, tmp, args.workers)
        if args.profile:                 # the proxy's own process under cProfile (no re-exec, one worker)
            cmd = [sys.executable, "-m", "cProfile", "-o", os.path.abspath(args.profile)] + cmd[1:]
            env["LLMPROXY_AS_MODULE"] = "1"
        px = subprocess.Popen(cmd, env=env, preexec_fn=pin(0) if pinning else None, stdout=subprocess.DEVNULL)
        relay = None
        if not args.no_relay:
            relay_port = free_port()
            relay = subprocess.Popen([sys.executable, __file__, "_relay", str(relay_port), str(up_port)],
                                     preexec_fn=pin(0) if pinning else None)
            wait_port(relay_port)
        if pinning and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})
        wait_port(px_port)
        time.sleep(0.3)
        figures["proxy_rss_idle_mb"] = round(rss_mb(px.pid), 1)
        only = set(filter(None, args.only.split(",")))
        direct_cache = {}
        for label, client, stream, conns in SCENARIOS:
            key = "%s_c%d" % (label.replace(" ", "_"), conns)
            if only and key not in only:
                continue
            if (stream, conns) not in direct_cache:
                direct_cache[(stream, conns)] = asyncio.run(load(up_port, conns, seconds, stream))
                if relay is not None:
                    direct_cache[("relay", stream, conns)] = asyncio.run(
                        measured(relay.pid, relay_port, conns, seconds, stream))
            direct = direct_cache[(stream, conns)]
            proxied, px_cpu = asyncio.run(measured(px.pid, px_port, conns, seconds, stream, client))
            d_rps = len(direct.latencies) / direct.elapsed
            p_rps = len(proxied.latencies) / proxied.elapsed
            fig = {"direct_rps": round(d_rps), "proxy_rps": round(p_rps), "ratio": round(p_rps / d_rps, 3),
                   "proxy_cpu_us": px_cpu,
                   "direct_p50_ms": round(pct(direct.latencies, 50) * 1000, 3),
                   "proxy_p50_ms": round(pct(proxied.latencies, 50) * 1000, 3),
                   "direct_p99_ms": round(pct(direct.latencies, 99) * 1000, 3),
                   "proxy_p99_ms": round(pct(proxied.latencies, 99) * 1000, 3),
                   "errors": direct.errors + proxied.errors}
            fig["added_p50_ms"] = round(fig["proxy_p50_ms"] - fig["direct_p50_ms"], 3)
            if relay is not None:
                rel, rel_cpu = direct_cache[("relay", stream, conns)]
                r_rps = len(rel.latencies) / rel.elapsed
                fig.update(relay_rps=round(r_rps), relay_cpu_us=rel_cpu, vs_relay_rps=round(p_rps / r_rps, 2),
                           vs_relay_cpu=round(px_cpu / rel_cpu, 2) if rel_cpu else None,
                           relay_added_p50_ms=round((pct(rel.latencies, 50) - pct(direct.latencies, 50)) * 1000, 3))
                if stream:
                    fig["relay_events_s"] = round(rel.events / rel.elapsed)
            if stream:
                fig["direct_events_s"] = round(direct.events / direct.elapsed)
                fig["proxy_events_s"] = round(proxied.events / proxied.elapsed)
                fig["added_ttfb_p50_ms"] = round((pct(proxied.ttfb, 50) - pct(direct.ttfb, 50)) * 1000, 3)
            figures[key] = fig
            rows.append(key)
        if args.streams:      # the slow upstream paces 40 ms an event: every stream stays open
            figures["proxy_rss_%d_streams_mb" % args.streams] = round(asyncio.run(hold_slow(px_port, args.streams,
                                                                                             px.pid)), 1)
        figures["proxy_rss_after_mb"] = round(rss_mb(px.pid), 1)
    finally:
        for p in ups:
            p.terminate()
        try:
            if relay is not None:
                relay.terminate()
            px.send_signal(signal.SIGINT if args.profile else signal.SIGTERM)   # cProfile writes on a clean exit
            px.wait(20)
        except NameError:
            pass
        for p in ups:
            p.wait(10)
    print_table(rows, figures)
    if any("relay_rps" in figures[k] for k in rows):
        print("%-18s %9s %9s %9s %9s %9s %12s" % ("vs bare relay", "relay/s", "proxy/s", "rps x", "relay us",
                                                   "proxy us", "cpu/req x"))
        for key in rows:
            r = figures[key]
            if "relay_rps" in r:
                print("%-18s %9d %9d %9.2f %9.1f %9.1f %12s" % (key, r["relay_rps"], r["proxy_rps"], r["vs_relay_rps"],
                                                               r["relay_cpu_us"], r["proxy_cpu_us"],
                                                               "%.2f" % r["vs_relay_cpu"] if r["vs_relay_cpu"] else "-"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


async def hold_slow(port, n, pid):
    body = json.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = request_bytes("/v1/chat/completions", body)
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        conns.append((r, w))
    for r, _ in conns:
        await r.readuntil(b"\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")              # the first event is through
    rss = rss_mb(pid)
    for _, w in conns:
        w.close()
    return rss


def print_table(rows, f):
    print("%-18s %9s %9s %6s %9s %9s %9s %9s %9s %10s %19s" % (
        "scenario", "direct/s", "proxy/s", "ratio", "d p50 ms", "p p50 ms", "d p99 ms", "p p99 ms", "added p50",
        "added ttfb", "events/s direct/px"))
    for key in rows:
        r = f[key]
        print("%-18s %9d %9d %6.2f %9.3f %9.3f %9.3f %9.3f %9.3f %10s %19s" % (
            key, r["direct_rps"], r["proxy_rps"], r["ratio"], r["direct_p50_ms"], r["proxy_p50_ms"],
            r["direct_p99_ms"], r["proxy_p99_ms"], r["added_p50_ms"],
            "%.3f" % r["added_ttfb_p50_ms"] if "added_ttfb_p50_ms" in r else "-",
            "%d/%d" % (r["direct_events_s"], r["proxy_events_s"]) if "proxy_events_s" in r else "-"))
    extra = ["RSS idle %.1f MB" % f["proxy_rss_idle_mb"]]
    for k, v in f.items():
        if k.startswith("proxy_rss_") and k.endswith("_streams_mb"):
            extra.append("with %s open streams %.1f MB" % (k.split("_")[2], v))
    extra.append("after load %.1f MB" % f["proxy_rss_after_mb"])
    extra.append("start-up to first response %.3f s" % f["startup_to_first_response_s"])
    print("; ".join(extra))


# soak ########################################################################
# --soak SECONDS: a mixed, concurrent load that checks every answer. Each request carries
# a nonce the fake upstream echoes; an answer with another request's nonce (or a 200 that
# is malformed) is a wrong answer. A second provider ("bad") points at an upstream that
# misbehaves on purpose (the client picks how, with a SOAKMODE: token in the prompt).

NONCE_RE = re.compile(rb"NONCE[0-9a-f]{16}")
MODE_RE = re.compile(rb"SOAKMODE:([a-z0-9_]+)")
BAD_MODES = ("ok", "stray", "double", "interim100", "interim101", "cut", "stall", "cl_te")
SOAK_HEAD_TIMEOUT = 2.0        # the proxy's limits.head_timeout_s / body_timeout_s in the soak config
SOAK_BAD_TIMEOUT = 1.0         # the bad provider's first_byte_timeout_s / idle_timeout_s
SOAK_REQ_TIMEOUT = 15.0        # any one soak exchange, end to end


def soak_json_reply(nonce: str, mode: str) -> bytes:
    return json.dumps({"id": "chatcmpl-" + nonce, "object": "chat.completion", "created": 1, "model": "bench",
                       "choices": [{"index": 0, "message": {"role": "assistant",
                                                            "content": "Reply for %s: ok [%s]" % (nonce, mode)},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}).encode()


def soak_events(nonce: str, mode: str) -> list:
    pieces = ["Reply ", "for " + nonce[:9], nonce[9:], ": ok", " [%s]" % mode, " t1", " t2"]
    out = []
    for p in pieces:            # the nonce is split over two events: the proxy must keep their order
        c = {"id": "chatcmpl-" + nonce, "object": "chat.completion.chunk", "created": 1, "model": "bench",
             "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n")
    out.append(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench","choices":'
               b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    out.append(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7}}\n\n')
    out.append(b"data: [DONE]\n\n")
    return out


async def soak_reply(writer, nonce: str, stream: bool, mode: str, rng, pace: float) -> bool:
    """Answer one request the way `mode` says; False: the connection is to be closed."""
    pre = b""
    if mode == "interim100":
        pre = b"HTTP/1.1 100 Continue\r\n\r\n"
    elif mode == "interim101":
        pre = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    if mode == "stall" and (not stream or rng.random() < 0.5):
        await asyncio.sleep(rng.choice((0.2, 0.5, SOAK_BAD_TIMEOUT + 0.6, SOAK_BAD_TIMEOUT + 1.5)))
        if writer.transport.is_closing():
            return False
    if mode == "double":        # a whole second reply for the same request, sent in the same write
        extra_body = soak_json_reply(nonce, "double-2nd")
        extra = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(extra_body), extra_body))
    elif mode == "stray":
        extra = rng.choice((b"\r\n", b"garbage-after-body\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nxyz",
                            b"\x00\xff" * 8))
    else:
        extra = b""
    if not stream:
        body = soak_json_reply(nonce, mode)
        if mode == "cl_te":      # both framings; Transfer-Encoding wins (RFC 9112 §6.3)
            resp = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + chunk(body[:20]) + chunk(body[20:]) + b"0\r\n\r\n")
        else:
            resp = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body))
        if mode == "cut":
            writer.write(pre + resp[:len(resp) - rng.randint(1, len(body) - 1)])
            await writer.drain()
            writer.close()
            return False
        writer.write(pre + resp + extra)
        await writer.drain()
        return True
    te = b"transfer-encoding: chunked\r\n"
    if mode == "cl_te":
        te = b"content-length: 3\r\n" + te
    writer.write(pre + b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + te + b"\r\n")
    events = soak_events(nonce, mode)
    cut_at = rng.randint(0, len(events) - 1) if mode == "cut" else -1
    stall_at = rng.randint(1, len(events) - 1) if mode == "stall" else -1
    for i, ev in enumerate(events):
        if i == cut_at:
            if rng.random() < 0.5:          # half a chunk, then the close
                writer.write(chunk(ev)[:rng.randint(1, len(ev))])
            await writer.drain()
            if rng.random() < 0.5:
                writer.transport.abort()
            else:
                writer.close()
            return False
        if i == stall_at:
            await asyncio.sleep(rng.choice((0.2, SOAK_BAD_TIMEOUT + 0.6)))
        elif pace:
            await asyncio.sleep(pace)
        if writer.transport.is_closing():
            return False
        if i == len(events) - 1:
            writer.write(chunk(ev) + b"0\r\n\r\n" + extra)
        else:
            writer.write(chunk(ev))
        await writer.drain()
    return True


def run_soak_upstream(port: int, bad: bool, seed: int, pace_ms: float):
    """A fake OpenAI upstream echoing each request's nonce; `bad`: misbehaves as told."""
    import random
    rng = random.Random(seed)
    pace = pace_ms / 1000.0

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
                m = NONCE_RE.search(body)
                nonce = m.group(0).decode() if m else "no-nonce"
                try:
                    stream = json.loads(body).get("stream") is True
                except (ValueError, AttributeError):
                    stream = False
                mode = "ok"
                if bad:
                    m = MODE_RE.search(body)
                    mode = m.group(1).decode() if m else rng.choice(BAD_MODES)
                if not await soak_reply(writer, nonce, stream, mode, rng, pace):
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=2048)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


class SoakStats:
    def __init__(self):
        import collections
        self.kinds = collections.defaultdict(collections.Counter)    # kind -> outcome -> count
        self.classes = collections.Counter()                         # 2xx/4xx/5xx/closed/timeout/hang-up
        self.wrong = []             # (kind, detail)
        self.hostile_dev = []       # (kind, outcome)
        self.normal_err = []        # (kind, outcome): the good route should always answer 200
        self.bad_unexpected = []    # (kind, outcome): the bad route may fail, but with 502/503/504 only
        self.lost_errors = []       # (kind, detail): a 200 stream cut short without an error the client can see
        self.issued = set()

    def count(self, kind, outcome, status=None):
        self.kinds[kind][outcome] += 1
        if status is not None:
            self.classes["%dxx" % (status // 100)] += 1
        else:
            self.classes[outcome] += 1

    def total(self):
        return sum(self.classes.values())


class Partial:
    """A proxy reply as far as it was read (kept when the read fails half way)."""

    def __init__(self):
        self.status = None
        self.headers = {}
        self.body = b""
        self.complete = False


async def soak_read(reader, part: Partial, max_chunks: int = -1):
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        part.status = int(lines[0].split(" ")[1])
        part.headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                part.headers[k.strip().lower()] = v.strip()
        if part.status >= 200:
            break
    if "chunked" in part.headers.get("transfer-encoding", "").lower():
        n = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":      # trailers
                    pass
                break
            data = await reader.readexactly(size + 2)
            part.body += data[:-2]
            n += 1
            if n == max_chunks:
                return
    elif "content-length" in part.headers:
        part.body = await reader.readexactly(int(part.headers["content-length"]))
    else:
        part.body = await reader.read()
    part.complete = True


class SoakReply:
    """What a client makes of a 200: the text, an error event, a proper end, unusable events."""

    def __init__(self):
        self.text = ""
        self.error = False          # an error event (parsed as such by an SSE client) or error object
        self.terminated = False     # JSON: parsed whole; stream: [DONE] (OpenAI) or message_stop (Anthropic)
        self.bad_events = []        # SSE events whose data is not JSON, or lines with an unknown field


SSE_FIELDS = ("data", "event", "id", "retry", "")


def soak_text(client: str, stream: bool, body: bytes) -> SoakReply:
    """Parse a 200 the way a client would; raises ValueError etc. on a malformed JSON reply."""
    rep = SoakReply()
    if not stream:
        obj = json.loads(body)
        if client == "openai":
            rep.text = obj["choices"][0]["message"]["content"]
        else:
            rep.text = "".join(b["text"] for b in obj["content"] if b.get("type") == "text")
        rep.terminated = True
        return rep
    out = []
    for block in re.split(r"\r\n\r\n|\n\n|\r\r", body.decode("utf-8", "replace")):
        data = []
        for line in block.splitlines():
            field, _, value = line.partition(":")
            if field not in SSE_FIELDS:          # an SSE client ignores such a line: say so
                rep.bad_events.append(line[:80])
            elif field == "data":
                data.append(value[1:] if value[:1] == " " else value)
        data = "\n".join(data)
        if not data:
            continue
        if data == "[DONE]":
            rep.terminated = True
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            rep.bad_events.append(data[:80])
            continue
        if not isinstance(obj, dict):
            rep.bad_events.append(data[:80])
        elif "error" in obj or obj.get("type") == "error":
            rep.error = True
        elif client == "openai":
            for ch in obj.get("choices") or []:
                out.append((ch.get("delta") or {}).get("content") or "")
        elif obj.get("type") == "content_block_delta" and obj["delta"].get("type") == "text_delta":
            out.append(obj["delta"]["text"])
        elif obj.get("type") == "message_stop":
            rep.terminated = True
    rep.text = "".join(out)
    return rep


def soak_body(client: str, model: str, stream: bool, prompt: str) -> bytes:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    if client == "anthropic":
        body["max_tokens"] = 64
    return json.dumps(body).encode()


PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
FORM = {"openai": "oc", "anthropic": "an-oc"}


def new_nonce(stats, rng) -> str:
    while True:
        nonce = "NONCE%016x" % rng.getrandbits(64)
        if nonce not in stats.issued:
            stats.issued.add(nonce)
            return nonce


def check_foreign(stats, kind, nonce, data, status) -> bool:
    foreign = {m.decode() for m in NONCE_RE.findall(data)} - {nonce}
    if foreign:
        stats.wrong.append((kind, "HTTP %s carries another request's nonce %s (own %s): %r"
                            % (status, sorted(foreign)[0], nonce, data[:300])))
        return True
    return False


async def soak_normal(port, conn, stats, rng, route):
    """One request on the client's keep-alive connection -> the connection to use next (None: closed)."""
    client = rng.choice(("openai", "anthropic"))
    stream = rng.random() < 0.5
    mode = rng.choice(BAD_MODES) if route == "bad" else "ok"
    kind = "%s %s %s" % ("good" if route == "good" else "bad/" + mode, FORM[client], "stream" if stream else "json")
    nonce = new_nonce(stats, rng)
    prompt = "Please echo %s back. SOAKMODE:%s" % (nonce, mode)
    req = request_bytes(PATHS[client], soak_body(client, "bench" if route == "good" else "bad", stream, prompt))
    part = Partial()
    if conn is None:
        conn = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = conn
    failure = None
    try:
        writer.write(req)
        await asyncio.wait_for(soak_read(reader, part), SOAK_REQ_TIMEOUT)
    except asyncio.TimeoutError:
        failure = "timeout"
    except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, IndexError) as e:
        failure = "closed" if part.status is None else "truncated (%s)" % type(e).__name__
    if check_foreign(stats, kind, nonce, part.body, part.status):
        stats.count(kind, "WRONG", part.status)
        writer.close()
        return None
    if part.status is None:
        outcome = failure
        stats.count(kind, outcome)
    else:
        outcome = str(part.status)
        if part.status == 200:
            try:
                rep = soak_text(client, stream, part.body)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError) as e:
                rep = None
                malformed = "%s: %s" % (type(e).__name__, e)
            if rep is None:
                outcome = "200 cut" if failure else "WRONG"
                if not failure:
                    stats.wrong.append((kind, "HTTP 200 that is not a valid reply (%s): %r"
                                        % (malformed, part.body[:300])))
            elif rep.error:
                outcome = "200 ok+error" if nonce in rep.text else "200 aborted"   # the client is told
            elif failure:
                outcome = "200 cut"                  # the connection dropped mid-reply: the client sees it
            elif rep.terminated and not rep.bad_events:
                if nonce in rep.text:
                    outcome = "200 ok"
                else:
                    outcome = "WRONG"
                    stats.wrong.append((kind, "HTTP 200 without its nonce %s: text %r: %r"
                                        % (nonce, rep.text[:120], part.body[:300])))
            else:       # a cleanly ended HTTP reply whose stream stopped early and no error event reached the client
                outcome = "200 error lost"
                stats.lost_errors.append((kind, "nonce %s, unusable lines %r, end of body %r"
                                          % ("present" if nonce in rep.text else "missing", rep.bad_events[:2],
                                             part.body[-200:])))
        stats.count(kind, outcome, part.status)
    if route == "good" and outcome != "200 ok" and outcome != "WRONG":
        stats.normal_err.append((kind, outcome))
    elif route == "bad" and outcome not in ("200 ok", "200 ok+error", "200 aborted", "200 cut", "200 error lost",
                                            "502", "503", "504", "WRONG"):
        stats.bad_unexpected.append((kind, outcome))
    if failure or not part.complete or part.headers.get("connection", "").lower() == "close":
        writer.close()
        return None
    return conn


async def soak_hangup(port, stats, rng):
    """The client goes away: mid-reply on a stream, right after (or half way through) sending otherwise."""
    client = rng.choice(("openai", "anthropic"))
    stream = rng.random() < 0.6
    route = "bad" if rng.random() < 0.2 else "good"
    kind = "hang-up %s %s%s" % (FORM[client], "stream" if stream else "json", " bad" if route == "bad" else "")
    nonce = new_nonce(stats, rng)
    req = request_bytes(PATHS[client], soak_body(client, "bench" if route == "good" else "bad", stream,
                                                 "Please echo %s back. SOAKMODE:ok" % nonce))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    part = Partial()
    try:
        if stream:
            writer.write(req)
            await asyncio.wait_for(soak_read(reader, part, max_chunks=rng.randint(1, 3)), SOAK_REQ_TIMEOUT)
        elif rng.random() < 0.3:
            writer.write(req[:rng.randint(1, len(req) - 1)])
            await writer.drain()
        else:
            writer.write(req)
            await writer.drain()
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() * 0.005)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
        pass
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()          # RST
        else:
            writer.close()                    # FIN
    check_foreign(stats, kind, nonce, part.body, part.status)
    stats.count(kind, "client hang-up")


HOSTILE_JSON = {
    "invalid-json": (b'{"model": "bench", "messages": [{"role": "user", "content": "hi"}', b'{model: bench}',
                     b'{"model": "bench", "messages": [}', b'\xff\xfe{"model": "bench"}'),
    "lone-surrogate": (b'{"model":"bench","messages":[{"role":"user","content":"hi \\ud800 there"}]}',
                       b'{"model":"bench","messages":[{"role":"user","content":"\\udfff"}],"stream":true}'),
    "nan": (b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
            b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"top_p":Infinity,"stream":true}'),
}


def hostile_payload(name, rng) -> bytes:
    auth = b"authorization: Bearer " + KEY.encode() + b"\r\n"
    if name == "garbage":
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
        return junk + (b"\r\n\r\n" if rng.random() < 0.7 else b"")
    if name == "oversize-headers":
        if rng.random() < 0.5:
            return b"GET /v1/models HTTP/1.1\r\nhost: b\r\n" + auth + b"x-big: " + b"a" * 70000 + b"\r\n\r\n"
        return (b"GET /v1/models HTTP/1.1\r\nhost: b\r\n" + auth
                + b"".join(b"x-h%d: v\r\n" % i for i in range(150)) + b"\r\n")
    if name == "cl+te":
        body = soak_body("openai", "bench", False, "smuggle")
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\n" + auth + b"content-type: application/json\r\n"
                b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(body)
                + chunk(body) + b"0\r\n\r\n")
    if name == "bare-lf":
        body = soak_body("openai", "bench", False, "bare lf")
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\n" + auth + b"content-length: %d\r\n\r\n"
                % len(body))
        if rng.random() < 0.5:
            head = head.replace(b"\r\n", b"\n")                         # never ends in CRLF CRLF
        else:
            head = head.replace(b"\r\nhost", b"\nhost", 1)              # one bare LF inside a CRLF head
        return head + body
    if name == "huge-cl":
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\n" + auth
                + b"content-type: application/json\r\ncontent-length: 99999999999999\r\n\r\n{\"model\":")
    if name == "unsent-cl":
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\n" + auth
                + b"content-type: application/json\r\ncontent-length: 200000\r\n\r\n{\"model\": \"bench\", ")
    raise KeyError(name)


async def hostile_answer(reader, timeout):
    """-> an HTTP status, "closed" or "timeout"."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.TimeoutError:
        return "timeout"
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
        return "closed"
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return "malformed answer %r" % head[:60]


async def soak_hostile(port, stats, rng):
    name = rng.choice(("garbage", "oversize-headers", "cl+te", "bare-lf", "invalid-json", "lone-surrogate", "nan",
                       "slowloris", "huge-cl", "unsent-cl"))
    limit = 2 * SOAK_HEAD_TIMEOUT + 3
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if name == "slowloris":
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\nauthorization: Bearer " + KEY.encode()
                    + b"\r\nx-slow: " + b"a" * 600)
            answer = asyncio.ensure_future(hostile_answer(reader, limit))
            for i in range(len(head)):
                if answer.done():
                    break
                try:
                    writer.write(head[i:i + 1])
                    await writer.drain()
                except (ConnectionError, OSError):
                    break
                await asyncio.wait([answer], timeout=0.1)
            result = await answer
        else:
            if name in HOSTILE_JSON:
                client = rng.choice(("openai", "anthropic"))
                name = "%s %s" % (name, FORM[client])
                body = rng.choice(HOSTILE_JSON[name.split()[0]])
                if client == "anthropic":
                    body = body.replace(b'{"model"', b'{"max_tokens":16,"model"', 1)
                data = request_bytes(PATHS[client], body)
            else:
                data = hostile_payload(name, rng)
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                pass
            result = await hostile_answer(reader, limit)
    finally:
        writer.transport.abort()
    kind = "hostile " + name
    if isinstance(result, int):
        stats.count(kind, str(result), result)
        if not 400 <= result < 500:
            stats.hostile_dev.append((kind, "HTTP %d" % result))
    else:
        stats.count(kind, result)
        if result != "closed":
            stats.hostile_dev.append((kind, result))


async def soak_client(port, deadline, stats, rng):
    conn = None
    while time.monotonic() < deadline:
        r = rng.random()
        try:
            if r < 0.05:
                await asyncio.wait_for(soak_hostile(port, stats, rng), SOAK_REQ_TIMEOUT + 5)
            elif r < 0.15:
                await asyncio.wait_for(soak_hangup(port, stats, rng), SOAK_REQ_TIMEOUT + 5)
            else:
                route = "bad" if r > 0.85 else "good"
                conn = await asyncio.wait_for(soak_normal(port, conn, stats, rng, route), SOAK_REQ_TIMEOUT + 5)
        except (asyncio.TimeoutError, ConnectionError, OSError) as e:     # the exchange's own guard
            stats.count("soak-client", "error %s" % type(e).__name__)
            if conn is not None:
                conn[1].transport.abort()
            conn = None
    if conn is not None:
        conn[1].close()


def proc_tree(pid):
    """pid and its descendants (the proxy's worker processes)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def open_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def proxy_usage(pid):
    pids = proc_tree(pid)
    return sum(rss_mb(p) for p in pids), sum(open_fds(p) for p in pids)


async def soak_load(port, seconds, clients, stats, seed, pid, proc):
    import random
    deadline = time.monotonic() + seconds
    tasks = [asyncio.ensure_future(soak_client(port, deadline, stats, random.Random(seed * 1000 + i)))
             for i in range(clients)]
    every = max(5.0, seconds / 10.0)
    t0 = time.monotonic()
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=every)
        if proc.poll() is not None:
            print("soak: the proxy exited with status %s mid-run" % proc.returncode, flush=True)
            break
        rss, fds = proxy_usage(pid)
        print("  t=%5.1f s  requests %6d  wrong %d  hostile deviations %d  good-route errors %d  errors lost %d  "
              "RSS %.1f MB  fds %d" % (time.monotonic() - t0, stats.total(), len(stats.wrong), len(stats.hostile_dev),
                                       len(stats.normal_err), len(stats.lost_errors), rss, fds), flush=True)
        if time.monotonic() > deadline + 2 * SOAK_REQ_TIMEOUT + 10:
            print("soak: clients still busy long after the end; cancelling them", flush=True)
            break
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def soak_warmup(port):
    body = soak_body("openai", "bench", False, "warm up NONCE%016x" % 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(PATHS["openai"], body))
        part = Partial()
        await asyncio.wait_for(soak_read(reader, part), SOAK_REQ_TIMEOUT)
        if part.status != 200:
            raise RuntimeError("warm-up request answered HTTP %s: %r" % (part.status, part.body[:300]))
    finally:
        writer.close()


def soak(args) -> int:
    up_port, bad_port, px_port = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp()
    cfg = {"env_providers": False, "log_level": "warning",
           "limits": {"head_timeout_s": SOAK_HEAD_TIMEOUT, "body_timeout_s": SOAK_HEAD_TIMEOUT},
           # no circuit breaker: the bad upstream keeps being exercised; quick retries
           "resilience": {"retry_backoff_s": 0.05, "retry_max_backoff_s": 0.2, "breaker_failures": 0},
           "providers": {"up": {"format": "openai", "base_url": "http://127.0.0.1:%d/v1" % up_port,
                                "keys": ["sk-soak-up"]},
                         "bad": {"format": "openai", "base_url": "http://127.0.0.1:%d/v1" % bad_port,
                                 "keys": ["sk-soak-bad"], "first_byte_timeout_s": SOAK_BAD_TIMEOUT,
                                 "idle_timeout_s": SOAK_BAD_TIMEOUT}},
           "routing": {"default": "up", "aliases": {"bad": "bad:bad"}}}
    cfg_path = os.path.join(tmp, "soak.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, LLMPROXY_API_KEYS=KEY, LLMPROXY_ADMIN_KEYS=KEY + "-admin")
    pinning = args.workers == 1
    log_path = os.path.join(tmp, "proxy.log")
    procs = []
    stats = SoakStats()
    px = None
    try:
        for port, bad in ((up_port, 0), (bad_port, 1)):
            procs.append(subprocess.Popen([sys.executable, __file__, "_soak_upstream", str(port), str(bad),
                                           str(args.seed + port), "2"], preexec_fn=pin(1)))
        wait_port(up_port)
        wait_port(bad_port)
        with open(log_path, "wb") as log_file:
            px = subprocess.Popen(proxy_cmd(cfg_path, px_port, tmp, args.workers), env=env,
                                  preexec_fn=pin(0) if pinning else None, stdout=log_file, stderr=log_file)
        if pinning and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})
        wait_port(px_port)
        asyncio.run(soak_warmup(px_port))
        time.sleep(0.3)
        rss0, fds0 = proxy_usage(px.pid)
        print("soak: %.0f s, %d clients, seed %d; proxy pid %d at start: RSS %.1f MB, %d open fds"
              % (args.soak, args.soak_clients, args.seed, px.pid, rss0, fds0), flush=True)
        asyncio.run(soak_load(px_port, args.soak, args.soak_clients, stats, args.seed, px.pid, px))
        time.sleep(1.5)                          # hung-up streams and timed-out upstreams wind down
        alive = px.poll() is None
        rss1, fds1 = proxy_usage(px.pid) if alive else (float("nan"), -1)
    finally:
        if px is not None:
            px.terminate()
            try:
                px.wait(10)
            except subprocess.TimeoutExpired:
                px.kill()
                px.wait(5)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return soak_report(stats, rss0, fds0, rss1, fds1, alive, log_path, args.strict)


def soak_report(stats, rss0, fds0, rss1, fds1, alive, log_path, strict) -> int:
    print()
    print("%-34s %7s  outcomes" % ("kind", "count"))
    for kind in sorted(stats.kinds):
        c = stats.kinds[kind]
        print("%-34s %7d  %s" % (kind, sum(c.values()), ", ".join("%s: %d" % kv for kv in sorted(c.items()))))
    print()
    print("requests answered: %d  (%s)" % (stats.total(),
                                           ", ".join("%s %d" % kv for kv in sorted(stats.classes.items()))))
    print("wrong answers: %d" % len(stats.wrong))
    for kind, detail in stats.wrong[:10]:
        print("  WRONG  %s: %s" % (kind, detail))
    print("hostile deviations (not a 4xx or a close): %d" % len(stats.hostile_dev))
    for kind, outcome in _firsts(stats.hostile_dev):
        print("  DEVIATION  %s -> %s" % (kind, outcome))
    print("good-route errors (anything but a 200 with its nonce): %d" % len(stats.normal_err))
    for kind, outcome in _firsts(stats.normal_err):
        print("  ERROR  %s -> %s" % (kind, outcome))
    print("streams cut short with no error event a client can parse (\"200 error lost\"): %d" % len(stats.lost_errors))
    for kind, detail in stats.lost_errors[:3]:
        print("  LOST  %s: %s" % (kind, detail))
    print("bad-route unexpected outcomes (not 200/502/503/504): %d" % len(stats.bad_unexpected))
    for kind, outcome in _firsts(stats.bad_unexpected):
        print("  UNEXPECTED  %s -> %s" % (kind, outcome))
    print("proxy RSS: %.1f MB at start, %.1f MB at end; open fds: %d at start, %d at end%s"
          % (rss0, rss1, fds0, fds1, "" if alive else " (the proxy had exited)"))
    try:
        with open(log_path, errors="replace") as f:
            log = f.read().splitlines()
    except OSError:
        log = []
    tracebacks = [i for i, line in enumerate(log) if line.startswith("Traceback")]
    print("proxy log: %d lines, %d tracebacks (%s)" % (len(log), len(tracebacks), log_path))
    seen = {}                                   # (innermost frame, exception) -> count, first request line
    for i in tracebacks:
        j = i + 1
        while j < len(log) and log[j][:1] in (" ", "\t"):
            j += 1
        frames = [line.strip() for line in log[i + 1:j] if line.strip().startswith("File ")]
        key = (frames[-1] if frames else "?", log[j].strip() if j < len(log) else "?")
        n, where = seen.get(key, (0, log[i - 1].split(" ", 1)[-1] if i else ""))
        seen[key] = (n + 1, where)
    for (frame, exc), (n, where) in sorted(seen.items(), key=lambda kv: -kv[1][0]):
        print("  x%d  %s\n       at %s\n       %s" % (n, exc, frame, where))
    bad = bool(stats.wrong) or not alive
    if strict:
        bad = bad or bool(stats.hostile_dev or stats.normal_err or stats.bad_unexpected or stats.lost_errors
                          or tracebacks)
    return 1 if bad else 0


def _firsts(items, n=12):
    """One example per distinct (kind, outcome), with how often it happened."""
    import collections
    c = collections.Counter(items)
    return [(kind, "%s  (x%d)" % (outcome, k)) for (kind, outcome), k in c.most_common(n)]


if __name__ == "__main__":
    if sys.argv[1:2] == ["_upstream"]:          # a fake upstream's own process
        run_upstream(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1:2] == ["_inproc"]:          # one target under callgrind (--instructions)
        run_inproc(sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]), sys.argv[6] == "1")
    elif sys.argv[1:2] == ["_relay"]:           # the bare reference relay's own process
        run_relay(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1:2] == ["_soak_upstream"]:   # the soak's nonce-echoing (or misbehaving) upstream
        run_soak_upstream(int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
