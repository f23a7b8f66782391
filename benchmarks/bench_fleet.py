"""A fleet against one cloud server: concurrent single-input clients, dynamic batching off and on.

    python benchmarks/bench_fleet.py --data-dir ../shared/data

For ResNet-20 and ShuffleNetV2 (split at their first stage, ID = the CIFAR-10
train subset), ``earlin serve-cloud`` runs in its own process with one torch
thread; N clients (asyncio, one connection each, in this process) send single
activations for a fixed time. Per N and batching setting: requests/s, p50/p99
latency, non-200 answers, wrong classes (every answer checked against the
cloud part run here), the server's resident memory, the mean inputs per run
of the cloud part (from the server's ``/metrics``). Beside them, in the same
run, the bare cloud part's throughput at batch 1 and batch 32 on as many
threads as the server has workers (each worker runs one), once at the start
and, at batch 32, again just before each setting (this shared machine's
speed drifts within a run): the ratio to that figure says how much of the
batched compute the server delivers on the same compute threads.
Each setting runs with 1 and 2 worker processes (``--workers``; the resident
memory is summed over the server's processes, and the connections each
worker holds are counted mid-run with ``ss`` where it is installed), with the
split's parts in PyTorch (``.pt2``) and, batching on, in ONNX Runtime
(``--runtime onnxruntime``: ``cloud.onnx``), each against the bare cloud part
in its own runtime. A server's event loop runs beside its compute thread, so
the server can use more cores than it has compute threads: the table gives
the cores it used.

The clients are aiohttp sessions, one connection each: a load generator
must leave the cores to the server. httpx's asyncio client spent 0.67-0.69
of a core on 32 clients' ~600 requests/s (the server then got 0.85 of a
core); aiohttp, 0.16-0.19 of a core on ~750 (the server 0.94-0.97), in one
side-by-side run on ResNet-20. Each setting reports the CPU share (cores)
of the server's processes and of the clients' process.
"""

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_collab import free_port, start_server  # noqa: E402
from bench_server import rss_mib  # noqa: E402
from common import first_stage, load_model, load_npz, machine, normalize, parse_args  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, load_split, save_split  # noqa: E402
from earlin_sklearn._cloud_onnx import onnx_parts  # noqa: E402
from earlin_sklearn.edge._wire import HEADER_BATCH, HEADER_ENCODING, HEADER_VERSION, encode  # noqa: E402

SETTINGS = {"off": ("--max-wait-ms", "0", "--batch-inputs", "1"), "on": ("--max-wait-ms", "2", "--batch-inputs", "64")}


def tree_rss_mib(pid):
    """Resident memory of a process and its descendants (the server's workers), in MiB (Linux ``/proc``)."""
    return sum(rss_mib(p) for p in tree_pids(pid))


def bare_throughput(cloud, payloads, batch, seconds):
    """Inputs per second of the cloud part alone on batches of ``batch`` (best of three timed spans)."""
    x = [torch.cat([p[i] for p in payloads[:batch]]) for i in range(len(payloads[0]))]
    best = 0.0
    with torch.inference_mode():
        cloud(*x)
        for _ in range(3):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                cloud(*x)
                n += batch
            best = max(best, n / (time.perf_counter() - t0))
    return best


def session(url, headers=None):
    """One client: an aiohttp session holding one keep-alive connection."""
    import aiohttp

    return aiohttp.ClientSession(base_url=url, headers=headers, connector=aiohttp.TCPConnector(limit=1),
                                 timeout=aiohttp.ClientTimeout(total=30))


def cpu_seconds(pids):
    """User + system CPU seconds of these processes (Linux ``/proc``)."""
    import os

    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tree_pids(pid):
    """A process and its descendants (the server's workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


async def http_ceiling(url, clients, seconds):
    """Requests/s of ``GET /livez`` (no body, no compute) from the same clients: what the HTTP stack alone allows."""
    n, stop = 0, time.perf_counter() + seconds

    async def client():
        nonlocal n
        async with session(url) as c:
            while time.perf_counter() < stop:
                async with c.get("/livez") as r:
                    await r.read()
                n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return n / (time.perf_counter() - t0)


def connections_per_process(port):
    """Established connections to ``port`` per process holding them, largest first (None without ``ss``)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=30).stdout
    counts = {}
    for line in out.splitlines():
        if "pid=" in line:
            pid = line.split("pid=")[1].split(",")[0]
            counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values(), reverse=True)


async def fleet(url, headers, bodies, expected, clients, seconds, server_pid=None, port=None):
    """N clients sending single activations for ``seconds``: requests/s, latencies, errors, the CPU share
    (cores) of the server's processes and of this process (the clients), and (with ``port``) the connections
    each server process holds halfway through."""
    import resource

    lat, codes, wrong = [], {}, 0
    stop = time.perf_counter() + seconds

    async def client(k):
        nonlocal wrong
        async with session(url, headers) as c:
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with c.post("/v1/activations", data=bodies[i % len(bodies)]) as r:
                    answer = await r.json() if r.status == 200 else await r.read()
                lat.append(time.perf_counter() - t0)
                codes[r.status] = codes.get(r.status, 0) + 1
                if r.status == 200 and answer["predictions"] != [expected[i % len(bodies)]]:
                    wrong += 1
                i += clients

    pids = tree_pids(server_pid) if server_pid is not None else []
    server0, own0 = cpu_seconds(pids), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    tasks = asyncio.gather(*[client(k) for k in range(clients)])
    spread = None
    if port is not None:
        await asyncio.sleep(seconds / 2)
        spread = await asyncio.to_thread(connections_per_process, port)
    await tasks
    wall = time.perf_counter() - t0
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"requests_per_s": len(lat) / wall, "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)), "non_200": sum(v for k, v in codes.items() if k != 200),
            "wrong_class": wrong, "requests": len(lat),
            "server_cores": (cpu_seconds(pids) - server0) / wall if pids else float("nan"),
            "client_cores": (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) / wall,
            "connections_per_worker": spread}


def batch_counts(url, headers):
    """``(runs, inputs)`` of the cloud part so far, from the server's ``/metrics`` (summed over its workers), read
    with prometheus-client's own parser of the text format."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers).text
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return values["earlin_batch_inputs_count"], values["earlin_batch_inputs_sum"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", default=["resnet20", "shufflenet"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--seconds", type=float, default=8.0, help="load time per setting")
    p.add_argument("--batching", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="serve-cloud --workers settings")
    p.add_argument("--runtimes", nargs="+", choices=["torch", "onnxruntime"], default=["torch", "onnxruntime"],
                   help="serve-cloud --runtime settings (onnxruntime with batching on only)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fleet"))
    args = parse_args(p, argv, "fleet", models=["resnet20"], clients=[3], seconds=0.5, batching=["on"], workers=[1])
    import httpx

    torch.set_num_threads(1)  # the server runs one torch thread too: the ratios compare like with like
    train = load_npz(args.data_dir, "cifar10_train_lossless5085.npz")
    test = load_npz(args.data_dir, "cifar10_test_lossless1017.npz")
    results = {"machine": machine(), "seconds": args.seconds, "models": {}}
    for name in args.models:
        model = load_model(args.data_dir, name).eval()
        X = normalize(train["x"][:1000], name)
        det = ShallowFeatureOODDetector(model, first_stage(name), device="cpu", n_threads=1).fit(X.numpy(),
                                                                                            train["y"][:1000])
        work = Path(tempfile.mkdtemp())
        save_split(*det.export_split(), work / "split", X[:4], formats=("pt2", "onnx"))
        manifest, edge, cloud = load_split(work / "split", as_split=False)  # the flat tuples these loops send
        T = normalize(test["x"][:64], name)
        with torch.inference_mode():
            payloads = [edge(T[i : i + 1])[2:] for i in range(len(T))]
            expected = [int(cloud(*pl).argmax(1)) for pl in payloads]
        bodies = [encode(pl, "float32") for pl in payloads]
        (work / "token").write_text("bench-token")
        headers = {"Authorization": "Bearer bench-token", HEADER_VERSION: manifest["version"],
                   HEADER_ENCODING: "float32", HEADER_BATCH: "1"}
        bare, parts = {}, {}  # runtime -> threads -> batch -> inputs/s: one thread per worker, as the server runs
        for threads in sorted(set(args.workers)):
            torch.set_num_threads(threads)
            parts[threads] = {"torch": cloud} | (
                {"onnxruntime": onnx_parts(work / "split", manifest, threads=threads)[1]}
                if "onnxruntime" in args.runtimes else {})
            for rt in args.runtimes:
                bare.setdefault(rt, {})[threads] = {b: bare_throughput(parts[threads][rt], payloads, b,
                                                                       args.seconds / 2) for b in (1, 32)}
        torch.set_num_threads(1)
        entry = {"bare_inputs_per_s": bare, "runs": []}
        print(name, "bare cloud part, inputs/s:", entry["bare_inputs_per_s"], flush=True)
        settings = [(rt, w, b) for rt in args.runtimes for w in args.workers for b in args.batching
                    if rt == "torch" or b == "on"]
        for runtime, workers, setting in settings:
            options = (*SETTINGS[setting], "--workers", str(workers), "--runtime", runtime)
            port = free_port()
            proc = start_server(work / "split", port, "--token-file", str(work / "token"), *options,
                                global_options=("--threads", "1"))
            url = f"http://127.0.0.1:{port}"
            try:
                with httpx.Client(base_url=url, headers=headers) as c:  # warm-up
                    for i in range(50):
                        c.post("/v1/activations", content=bodies[i % len(bodies)])
                if setting == "on" and workers == args.workers[0] and runtime == args.runtimes[0]:
                    entry["http_ceiling_req_s"] = {n: asyncio.run(http_ceiling(url, n, args.seconds / 2))
                                                   for n in args.clients}
                    print(name, "GET /livez, requests/s:", entry["http_ceiling_req_s"], flush=True)
                for n in args.clients:
                    # the bare part again, just before: this shared machine's speed drifts over a run
                    torch.set_num_threads(workers)
                    now = bare_throughput(parts[workers][runtime], payloads, 32, min(2.0, args.seconds / 4))
                    torch.set_num_threads(1)
                    before = batch_counts(url, headers)
                    run = asyncio.run(fleet(url, headers, bodies, expected, n, args.seconds, proc.pid, port))
                    after = batch_counts(url, headers)
                    run.update(runtime=runtime, batching=setting, workers=workers, clients=n,
                               server_rss_mib=tree_rss_mib(proc.pid),
                               bare_batch32_before=now, vs_bare_batch32=run["requests_per_s"] / now,
                               mean_batch_inputs=(after[1] - before[1]) / max(after[0] - before[0], 1))
                    entry["runs"].append(run)
                    print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}, flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        results["models"][name] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    m = results["machine"]
    lines = [f"# bench_fleet ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; {args.seconds:g} s per "
             "setting; one compute thread per worker, the bare cloud part on as many; clients in one asyncio process, "
             "aiohttp)",
             "", "| model | runtime | workers | batching | clients | req/s | bare batch 32 just before, inputs/s | "
             "ratio | p50 ms | p99 ms | non-200 | wrong | inputs per cloud run | connections per worker | "
             "server cores | client cores | RSS MiB (all processes) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for r in entry["runs"]:
            lines.append(f"| {name} | {r['runtime']} | {r['workers']} | {r['batching']} | {r['clients']} | "
                         f"{r['requests_per_s']:.0f} | {r['bare_batch32_before']:.0f} | "
                         f"{r['vs_bare_batch32']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_200']} | "
                         f"{r['wrong_class']} | {r['mean_batch_inputs']:.1f} | "
                         f"{'/'.join(map(str, r['connections_per_worker'] or [])) or '-'} | "
                         f"{r['server_cores']:.2f} | {r['client_cores']:.2f} | "
                         f"{r['server_rss_mib']:.0f} |")
    lines.append("")
    for name, entry in results["models"].items():
        bare = entry["bare_inputs_per_s"]
        lines.append(f"- {name}: bare cloud part " + "; ".join(
                         f"{rt} on {t} thread{'s' * (t > 1)} {b[1]:.0f} inputs/s at batch 1, {b[32]:.0f} at batch 32"
                         for rt, per in bare.items() for t, b in per.items())
                     + "; the HTTP stack alone (GET /livez, no "
                     "body, no compute, same clients): "
                     + ", ".join(f"{v:.0f} req/s at {n} clients" for n, v in entry["http_ceiling_req_s"].items()) + ".")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
