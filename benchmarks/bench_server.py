"""Load test and fuzzing of the cloud server on loopback: throughput, latency, memory, and no wrong answers.

    python benchmarks/bench_server.py

A ResNet-20 (CIFAR shape, seeded random weights: speed and correctness of the
server do not depend on the weights) is split at ``layer1`` and served by
``earlin serve-cloud`` in its own process, with a token. Then:

1. warm-up, and the server's RSS (its warm baseline);
2. load: concurrent clients on loopback send valid activation payloads;
   requests/s, p50/p99 latency, and every answer checked against the cloud part
   run in this process on the same payload;
3. fuzz: 2,000 requests with mutated headers and bodies (missing or wrong
   version, token, encoding and batch headers; random, truncated, extended,
   NaN/inf and overflowing bodies; chunked bodies far over the limit, valid
   requests mixed in). No answer may be a 5xx, and every 200 must carry the
   class the in-process cloud part gives for that body;
4. the server's RSS again, against its warm baseline;
5. large bodies: rounds of 24 requests of 256 inputs each (16.8 MB bodies),
   8 at a time, then the RSS after a few seconds idle, against the warm
   baseline (the server hands freed memory back once large requests stop).
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_collab import free_port, start_server  # noqa: E402
from common import parse_args, machine  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, load_split, save_split  # noqa: E402
from earlin_sklearn.edge._wire import HEADER_BATCH, HEADER_ENCODING, HEADER_VERSION, decode, encode  # noqa: E402
from earlin_sklearn.models import cifar_resnet  # noqa: E402

TOKEN = "bench-token"


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000, help="load requests in all")
    p.add_argument("--fuzz", type=int, default=2000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "server"))
    p.add_argument("--large-batch", type=int, default=256, help="inputs per large request")
    p.add_argument("--large-bodies", type=int, default=24, help="large requests per round")
    p.add_argument("--large-rounds", type=int, default=3)
    p.add_argument("--idle", type=float, default=5.0, help="seconds idle before the last RSS reading")
    args = parse_args(p, argv, "server", clients=2, requests=24, fuzz=24, large_batch=16, large_bodies=2,
                      large_rounds=1, idle=1.5)
    import httpx

    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    X = torch.randn(400, 3, 32, 32)
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(X.numpy(), np.arange(400) % 10)
    work = Path(tempfile.mkdtemp())
    save_split(*det.export_split(), work / "split", X[:4], formats=("pt2",))
    manifest, edge, cloud = load_split(work / "split", as_split=False)  # the flat tuples these loops send
    (work / "token").write_text(TOKEN)
    with torch.inference_mode():
        payloads = [edge(X[i : i + 1])[2:] for i in range(64)]
    shapes = [tuple(p["shape"]) for p in manifest["payload"]]
    headers = {"Authorization": f"Bearer {TOKEN}", HEADER_VERSION: manifest["version"],
               HEADER_ENCODING: "float32", HEADER_BATCH: "1"}

    def expected(body, batch, encoding):
        with torch.inference_mode():
            return cloud(*[torch.from_numpy(t) for t in decode(body, shapes, batch, encoding)]).argmax(1).tolist()

    port = free_port()
    proc = start_server(work / "split", port, "--token-file", str(work / "token"), "--max-queue", "4096",
                        global_options=("--threads", "1"))
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, headers=headers) as c:
            for i in range(200):
                c.post("/v1/activations", content=encode(payloads[i % 64], "float32"))
        warm_rss = rss_mib(proc.pid)

        # 2. load
        lat, wrong, errors = [], [0], [0]
        lock = threading.Lock()

        def client(k):
            with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
                for i in range(args.requests // args.clients):
                    body = encode(payloads[(k * 7 + i) % 64], "float32")
                    t0 = time.perf_counter()
                    r = c.post("/v1/activations", content=body)
                    dt = time.perf_counter() - t0
                    with lock:
                        lat.append(dt)
                        if r.status_code != 200:
                            errors[0] += 1
                        elif r.json()["predictions"] != expected(body, 1, "float32"):
                            wrong[0] += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - t0
        load = {"clients": args.clients, "requests": len(lat), "requests_per_s": len(lat) / wall,
                "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                "non_200": errors[0], "wrong_class": wrong[0]}
        print(load, flush=True)
        load_rss = rss_mib(proc.pid)

        # 3. fuzz
        rng = random.Random(0)
        statuses, fuzz_wrong, five_xx = {}, 0, []
        valid = encode(payloads[0], "float32")

        def mutate():
            h = dict(headers)
            body = valid
            kind = rng.choice(["valid", "version", "token", "encoding", "batch", "random", "truncate", "extend",
                               "nan", "overflow", "zero", "huge", "flip"])
            if kind == "version":
                if rng.random() < 0.2:
                    del h[HEADER_VERSION]
                else:
                    h[HEADER_VERSION] = rng.choice(["", "0" * 64, manifest["version"][:-1] + "x",
                                                    "\u00e9".encode().decode("latin-1")])
            elif kind == "token":
                h["Authorization"] = rng.choice(["", "Bearer", "Bearer x", "Basic abc", TOKEN])
            elif kind == "encoding":
                h[HEADER_ENCODING] = rng.choice(["bfloat16", "", "FLOAT32", "int8", "float16", "x" * 100])
            elif kind == "batch":
                h[HEADER_BATCH] = rng.choice(["0", "-1", "2", "257", "1e3", "", "99999999999999999999", " 1"])
            elif kind == "random":
                body = os.urandom(rng.choice([0, 1, 7, len(valid), 2 * len(valid)]))
            elif kind == "truncate":
                body = valid[: rng.randrange(len(valid))]
            elif kind == "extend":
                body = valid + os.urandom(rng.randrange(1, 64))
            elif kind == "nan":
                body = encode([torch.full_like(t, float(rng.choice(["nan", "inf", "-inf"]))) for t in payloads[0]],
                              "float32")
            elif kind == "overflow":
                body = encode([t * 1e38 for t in payloads[0]], "float32")
            elif kind == "zero":
                body = encode([torch.zeros_like(t) for t in payloads[0]], "float32")
            elif kind == "huge":  # chunked, no length announced, far over the limit
                body = iter([b"\0" * (1 << 20)] * 8)
            elif kind == "flip":
                b = bytearray(valid)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                body = bytes(b)
            return kind, h, body

        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(args.fuzz):
                kind, h, body = mutate()
                try:
                    r = c.post(rng.choice(["/v1/activations", "/v1/activations", "/v1/raw"]) if kind != "valid"
                               else "/v1/activations", content=body, headers=h)
                except (httpx.LocalProtocolError, UnicodeEncodeError):  # a header httpx itself will not send
                    statuses["not sent"] = statuses.get("not sent", 0) + 1
                    continue
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 500:
                    five_xx.append((kind, r.status_code, r.text[:100]))
                elif r.status_code == 200 and r.request.url.path == "/v1/activations" and isinstance(body, bytes):
                    enc = h.get(HEADER_ENCODING, "float32")
                    if r.json()["predictions"] != expected(body, int(h.get(HEADER_BATCH, "1")), enc):
                        fuzz_wrong += 1
        time.sleep(2)
        end_rss = rss_mib(proc.pid)
        fuzz = {"requests": args.fuzz, "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
                "5xx": len(five_xx), "wrong_class": fuzz_wrong, "examples_5xx": five_xx[:5]}
        print(fuzz, flush=True)

        # 5. large bodies: rounds of batch-256 requests (16.8 MB bodies for ResNet-20 at layer1), then idle
        large = encode([torch.cat([p[k] for p in payloads] * 4)[: args.large_batch] for k in range(len(payloads[0]))],
                       "float32")
        big = {**headers, HEADER_BATCH: str(args.large_batch)}

        def send_large(_):
            with httpx.Client(base_url=url, timeout=300) as c:
                return c.post("/v1/activations", content=large, headers=big).status_code

        large_codes, peak = {}, end_rss
        for _ in range(args.large_rounds):
            with ThreadPoolExecutor(8) as pool:
                for code in pool.map(send_large, range(args.large_bodies)):
                    large_codes[code] = large_codes.get(code, 0) + 1
            peak = max(peak, rss_mib(proc.pid))
        time.sleep(args.idle)
        idle_rss = rss_mib(proc.pid)
        bodies = {"body_mb": len(large) / 1e6, "rounds": args.large_rounds, "bodies_per_round": args.large_bodies,
                  "statuses": {str(k): v for k, v in large_codes.items()}, "peak_mib": peak, "idle_s": args.idle,
                  "after_idle_mib": idle_rss, "after_idle_vs_warm": idle_rss / warm_rss}
        print(bodies, flush=True)
        alive = httpx.get(f"{url}/livez").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    memory = {"warm_mib": warm_rss, "after_load_mib": load_rss, "after_fuzz_mib": end_rss,
              "after_fuzz_vs_warm": end_rss / warm_rss}
    lines = [f"Command: `python benchmarks/bench_server.py`; machine: {machine()['cpu']}; server with --threads 1", "",
             f"Load: {load['clients']} clients, {load['requests']} requests: {load['requests_per_s']:.0f} requests/s, "
             f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms; non-200 answers: {load['non_200']}; "
             f"wrong classes: {load['wrong_class']}.", "",
             f"Fuzz: {fuzz['requests']} requests; answers by status: {fuzz['statuses']}; 5xx: {fuzz['5xx']}; "
             f"wrong classes among the 200s: {fuzz['wrong_class']}; still serving afterwards: {alive}.", "",
             f"Server RSS: warm {warm_rss:.0f} MiB, after the load {load_rss:.0f} MiB, after the fuzz "
             f"{end_rss:.0f} MiB ({100 * (memory['after_fuzz_vs_warm'] - 1):+.1f}% against warm).", "",
             f"Large bodies: {bodies['rounds']} rounds of {bodies['bodies_per_round']} requests of "
             f"{args.large_batch} inputs ({bodies['body_mb']:.1f} MB bodies, 8 at a time; answers by status: "
             f"{bodies['statuses']}): RSS peak {peak:.0f} MiB, {idle_rss:.0f} MiB after {args.idle:g} s idle "
             f"({100 * (bodies['after_idle_vs_warm'] - 1):+.1f}% against warm)."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"machine": machine(), "load": load, "fuzz": fuzz, "memory": memory,
                                                  "large_bodies": bodies,
                                                  "alive": alive}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
