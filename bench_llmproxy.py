#!/usr/bin/env python3
"""Benchmark llmproxy against calling a fast fake upstream directly (standard library only).

    python3 bench_llmproxy.py                 # full run, prints a table
    python3 bench_llmproxy.py --quick         # shorter runs
    python3 bench_llmproxy.py --json out.json # also write the figures as JSON

The fake upstream answers OpenAI chat completions (JSON, or an SSE stream of
--events chunks). The proxy runs in its own process pinned to CPU 0 (where
os.sched_setaffinity exists); the upstream and the load generator share CPU 1.
Every scenario is measured twice in the same run: straight at the upstream,
then through the proxy.
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

CHAT = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, this is a "
                                "benchmark reply of moderate length."}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}).encode()


def stream_body(events: int) -> bytes:
    out = []
    for i in range(events):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "bench",
                 "choices": [{"index": 0, "delta": {"content": "tok%d " % i}, "finish_reason": None}]}
        data = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        out.append(b"%x\r\n%s\r\n" % (len(data), data))
    tail = b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d}}\n\ndata: [DONE]\n\n' % events
    out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
    return b"".join(out)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, events):
        self.buf = b""
        self.json_reply = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                           % (len(CHAT), CHAT))
        self.sse_reply = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                          + stream_body(events))

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
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(self.sse_reply if b'"stream":true' in body or b'"stream": true' in body
                                 else self.json_reply)


def run_upstream(port: int, events: int):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: UpstreamProtocol(events), "127.0.0.1", port)
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


async def one_connection(port, body, stream, deadline, result):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\nauthorization: Bearer %s\r\n"
           b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(req)
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
            result.latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def load(port, conns, seconds, stream):
    body = json.dumps({"model": "bench", "stream": stream,
                       "messages": [{"role": "user", "content": "Say hello"}]}).encode()
    result = Result()
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection(port, body, stream, deadline, result) for _ in range(conns)))
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
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        return lambda: os.sched_setaffinity(0, {cpu})
    return None


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("port %d never opened" % port)


def rss_mb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per measurement instead of 3")
    ap.add_argument("--events", type=int, default=100, help="events per streamed reply")
    ap.add_argument("--json", metavar="FILE", help="write the figures here too")
    ap.add_argument("--workers", type=int, default=1, help="proxy worker processes (pinning is then off)")
    ap.add_argument("--only", default="", help="comma-separated scenarios, e.g. chat_c16,stream_c32")
    args = ap.parse_args()
    seconds = 1.0 if args.quick else 3.0
    up_port, px_port = free_port(), free_port()
    tmp = tempfile.mkdtemp()
    cfg = {"env_providers": False, "log_level": "warning",
           "providers": {"up": {"base_url": "http://127.0.0.1:%d/v1" % up_port}}}
    cfg_path = os.path.join(tmp, "bench.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, LLMPROXY_API_KEYS=KEY, LLMPROXY_ADMIN_KEYS=KEY + "-admin")
    up = subprocess.Popen([sys.executable, __file__, "_upstream", str(up_port), str(args.events)], preexec_fn=pin(1))
    t_start = time.perf_counter()
    pinning = args.workers == 1
    px = subprocess.Popen([sys.executable, os.path.join(HERE, "llmproxy.py"), "--config", cfg_path,
                           "--port", str(px_port), "--data-dir", tmp, "--workers", str(args.workers)], env=env,
                          preexec_fn=pin(0) if pinning else None, stdout=subprocess.DEVNULL)
    if pinning and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    rows = []
    figures = {}
    try:
        wait_port(up_port)
        wait_port(px_port)
        startup = time.perf_counter() - t_start
        idle = rss_mb(px.pid)
        only = set(filter(None, args.only.split(",")))
        for label, stream, conns in [("chat", False, 1), ("chat", False, 16), ("chat", False, 64),
                                     ("stream", True, 1), ("stream", True, 32)]:
            if only and "%s_c%d" % (label, conns) not in only:
                continue
            direct = asyncio.run(load(up_port, conns, seconds, stream))
            proxied = asyncio.run(load(px_port, conns, seconds, stream))
            key = "%s_c%d" % (label, conns)
            d_rps = len(direct.latencies) / direct.elapsed
            p_rps = len(proxied.latencies) / proxied.elapsed
            fig = {"direct_rps": round(d_rps), "proxy_rps": round(p_rps), "ratio": round(p_rps / d_rps, 3),
                   "direct_p50_ms": round(pct(direct.latencies, 50) * 1000, 3),
                   "proxy_p50_ms": round(pct(proxied.latencies, 50) * 1000, 3),
                   "direct_p99_ms": round(pct(direct.latencies, 99) * 1000, 3),
                   "proxy_p99_ms": round(pct(proxied.latencies, 99) * 1000, 3),
                   "errors": direct.errors + proxied.errors}
            if stream:
                fig["direct_events_s"] = round(direct.events / direct.elapsed)
                fig["proxy_events_s"] = round(proxied.events / proxied.elapsed)
                fig["added_ttfb_p50_ms"] = round((pct(proxied.ttfb, 50) - pct(direct.ttfb, 50)) * 1000, 3)
            fig["added_p50_ms"] = round(fig["proxy_p50_ms"] - fig["direct_p50_ms"], 3)
            figures[key] = fig
            rows.append(key)
        figures["proxy_rss_idle_mb"] = round(idle, 1)
        figures["proxy_rss_after_mb"] = round(rss_mb(px.pid), 1)
        figures["startup_s"] = round(startup, 3)
    finally:
        px.terminate()
        up.terminate()
        px.wait(10)
        up.wait(10)
    print("%-12s %10s %10s %6s %9s %9s %9s %9s %10s %11s" % ("scenario", "direct/s", "proxy/s", "ratio", "d p50 ms",
                                                           "p p50 ms", "d p99 ms", "p p99 ms", "added p50", "events/s"))
    for key in rows:
        f = figures[key]
        print("%-12s %10d %10d %6.2f %9.3f %9.3f %9.3f %9.3f %10.3f %11s" % (
            key, f["direct_rps"], f["proxy_rps"], f["ratio"], f["direct_p50_ms"], f["proxy_p50_ms"],
            f["direct_p99_ms"], f["proxy_p99_ms"], f["added_p50_ms"],
            "%d/%d" % (f["direct_events_s"], f["proxy_events_s"]) if "proxy_events_s" in f else "-"))
    print("proxy RSS idle %.1f MB, after load %.1f MB; start-up to listening %.3f s" % (
        figures["proxy_rss_idle_mb"], figures["proxy_rss_after_mb"], figures["startup_s"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_upstream"]:          # the fake upstream's own process
        run_upstream(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
