#!/usr/bin/env python3
"""`sdgen serve` under load: requests per minute for 1, 4 and 16 concurrent clients, and what
the HTTP layer adds to a request (the client's time minus the job's own, from the answer's
`Server-Timing`).

    python3 scripts/bench_serve.py SDGEN_BINARY MODEL_DIR [--clients 1,4,16] [--requests N]
        [--size 256] [--steps 4] [--dtype f32]

Each client sends web UI txt2img requests (size x size, `steps` steps, CFG 7) one after
another; a setting runs until N requests (default 2 per client, at least 8) are answered.
Prints one JSON line per setting, then a table. Python's standard library only.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def start(binary, model, dtype):
    p = subprocess.Popen([binary, "serve", "--model", model, "--port", "0", "--dtype", dtype,
                          "--queue", "64"], stderr=subprocess.PIPE, text=True)
    t = time.perf_counter()
    for line in p.stderr:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, int(m[1]), time.perf_counter() - t
    sys.exit("sdgen serve ended before listening")


def request(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
                                 data=json.dumps(body).encode(), method="POST")
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as r:
        timing = r.headers.get("Server-Timing", "")
        data = r.read()
    total = time.perf_counter() - t
    gen = float(re.search(r"dur=([\d.]+)", timing)[1]) / 1000
    assert len(json.loads(data)["images"]) == 1
    return total, gen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("model")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="f32")
    args = ap.parse_args()
    server, port, load_s = start(args.binary, args.model, args.dtype)
    rows = []
    try:
        body = lambda seed: {"prompt": "a photo of a cat on a beach", "seed": seed, "steps": args.steps,
                             "width": args.size, "height": args.size, "cfg_scale": 7,
                             "sampler_name": "Euler"}
        request(port, body(0))  # warm-up
        for clients in [int(c) for c in args.clients.split(",")]:
            n = args.requests or max(8, 2 * clients)
            lock = threading.Lock()
            sent = [0]
            results = []

            def client():
                while True:
                    with lock:
                        if sent[0] >= n:
                            return
                        sent[0] += 1
                        seed = sent[0]
                    r = request(port, body(seed))
                    with lock:
                        results.append(r)

            t = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            row = {
                "clients": clients, "requests": n, "wall_s": wall,
                "requests_per_min": n / wall * 60,
                "median_latency_s": statistics.median(r[0] for r in results),
                "median_generation_s": statistics.median(r[1] for r in results),
            }
            if clients == 1:
                # sequential: no queueing, so the rest of a request's time is the HTTP layer's
                over = [r[0] - r[1] for r in results]
                row["http_overhead_ms"] = statistics.median(over) * 1000
                row["http_overhead_share"] = statistics.median(o / r[1] for o, r in zip(over, results))
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"\nsdgen serve, {args.size}x{args.size}, {args.steps} steps, {args.dtype}; model loaded in {load_s:.1f} s")
    print("| clients | requests | requests/min | median latency (s) | median generation (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_min']:.1f} | "
              f"{r['median_latency_s']:.2f} | {r['median_generation_s']:.2f} |")
    one = next((r for r in rows if "http_overhead_ms" in r), None)
    if one:
        print(f"HTTP layer per request (1 client): {one['http_overhead_ms']:.1f} ms, "
              f"{one['http_overhead_share'] * 100:.2f}% of a generation")


if __name__ == "__main__":
    main()
