#!/usr/bin/env python3
"""Benchmark llmproxy against calling a fast fake upstream directly (standard library only).

    python3 bench_llmproxy.py                  # full run (about a minute), prints one table
    python3 bench_llmproxy.py --quick          # 1 s per measurement
    python3 bench_llmproxy.py --json out.json  # also write the figures as JSON
    python3 bench_llmproxy.py --workers 2      # the proxy with two worker processes

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


def run_upstream(port: int, events: int, pace_ms: float):
    sse_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    replies = {}
    for fmt, body, evs in (("openai", openai_reply(), openai_events(events)),
                           ("anthropic", anthropic_reply(), anthropic_events(events))):
        replies[(fmt, False)] = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))
        replies[(fmt, True)] = sse_head + b"".join(chunk(e) for e in evs) + b"0\r\n\r\n"
        replies[(fmt, "events")] = evs

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


SCENARIOS = [  # (name, client format, stream, connections)
    ("chat", "openai", False, 1), ("chat", "openai", False, 16), ("chat", "openai", False, 64),
    ("stream", "openai", True, 1), ("stream", "openai", True, 32),
    ("an>oc", "anthropic", False, 16), ("an>oc stream", "anthropic", True, 32),
]


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
    args = ap.parse_args()
    seconds = 1.0 if args.quick else 3.0
    up_port, slow_port, px_port = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp()
    cfg = {"env_providers": False, "log_level": "warning",
           "providers": {"up": {"base_url": "http://127.0.0.1:%d/v1" % up_port},
                         "slow": {"base_url": "http://127.0.0.1:%d/v1" % slow_port}},
           "routing": {"default": "up", "aliases": {"slow": "slow:bench"}}}
    if args.guardrails:
        cfg["guardrails"] = {"tool_repair": {"enabled": True}, "json_repair": {"enabled": True},
                             "loop_detection": {"enabled": True}, "dangerous_commands": {"enabled": True},
                             "redact": {"enabled": True},
                             "rewrite": [{"target": "reply", "action": "replace", "match": "zzz", "with": "z"}]}
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
        px = subprocess.Popen(proxy_cmd(cfg_path, px_port, tmp, args.workers), env=env,
                              preexec_fn=pin(0) if pinning else None, stdout=subprocess.DEVNULL)
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
            direct = direct_cache[(stream, conns)]
            proxied = asyncio.run(load(px_port, conns, seconds, stream, client))
            d_rps = len(direct.latencies) / direct.elapsed
            p_rps = len(proxied.latencies) / proxied.elapsed
            fig = {"direct_rps": round(d_rps), "proxy_rps": round(p_rps), "ratio": round(p_rps / d_rps, 3),
                   "direct_p50_ms": round(pct(direct.latencies, 50) * 1000, 3),
                   "proxy_p50_ms": round(pct(proxied.latencies, 50) * 1000, 3),
                   "direct_p99_ms": round(pct(direct.latencies, 99) * 1000, 3),
                   "proxy_p99_ms": round(pct(proxied.latencies, 99) * 1000, 3),
                   "errors": direct.errors + proxied.errors}
            fig["added_p50_ms"] = round(fig["proxy_p50_ms"] - fig["direct_p50_ms"], 3)
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
            px.terminate()
            px.wait(10)
        except NameError:
            pass
        for p in ups:
            p.wait(10)
    print_table(rows, figures)
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["_upstream"]:          # a fake upstream's own process
        run_upstream(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
