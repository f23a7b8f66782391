"""The status page of a server with a simulated fleet, photographed in headless Chromium (the docs' screenshot).

    python benchmarks/status_page.py

A real server (in this process, on loopback, no token) and a simulated
fleet: eight cameras that report every few seconds (50 inputs each time,
accepted at the target rate of 95%), of which ``cam-3`` starts rejecting
(60% accepted) halfway through and ``cam-6`` drifts slowly (88%), while a
client sends single activations. After ``--seconds`` the page is rendered by
Debian's chromium at 1280 px into ``--out`` (by default the docs' image).
The split is a small random CNN: the page is about the fleet, not the model.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from common import parse_args  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, load_split, save_split  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402
from earlin_sklearn.edge._wire import HEADER_BATCH, HEADER_ENCODING, HEADER_VERSION, encode  # noqa: E402
from tests.conftest import make_images, make_tiny_cnn, uvicorn_running  # noqa: E402

DEVICES = {f"cam-{i}": 0.95 for i in range(1, 9)}
DRIFT = {"cam-3": 0.60, "cam-6": 0.88}


def simulate(url, manifest, payload, seconds, report_every, stop):
    import httpx

    rng = np.random.default_rng(0)
    headers = {HEADER_VERSION: manifest["version"]}
    start = time.time()

    def reports():
        with httpx.Client(base_url=url, headers=headers) as client:
            while not stop.is_set() and time.time() - start < seconds:
                late = time.time() - start > seconds / 2
                for device, rate in DEVICES.items():
                    rate = DRIFT.get(device, rate) if late else rate
                    client.post("/v1/report", json={"device": device, "seen": 50,
                                                    "accepted": int(rng.binomial(50, rate))})
                stop.wait(report_every)

    def inference():
        body = encode([payload], "float32")
        with httpx.Client(base_url=url, headers={**headers, HEADER_BATCH: "1", HEADER_ENCODING: "float32",
                                                 "Content-Type": "application/octet-stream"}) as client:
            while not stop.is_set() and time.time() - start < seconds:
                client.post("/v1/activations", content=body)
                stop.wait(float(rng.exponential(0.05)))

    threads = [threading.Thread(target=reports), threading.Thread(target=inference)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=150.0)
    p.add_argument("--report-every", type=float, default=5.0)
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "_static" / "status.png"))
    args = parse_args(p, argv, "status_page", seconds=3.0, report_every=0.5)
    if args.smoke:
        args.out = str(Path(args.out) / "status.png")
    torch.manual_seed(0)
    X, y = make_images(60)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    work = Path(tempfile.mkdtemp())
    save_split(*det.export_split(), work / "split", torch.from_numpy(X[:4]), formats=("pt2",))
    split = load_split(work / "split", as_split=True)
    with torch.inference_mode():
        payload = split.edge(torch.from_numpy(X[:1])).payload
    app = create_cloud_app(work / "split")
    stop = threading.Event()
    with uvicorn_running(app, log_level="error") as url:
        simulate(url, split.manifest, payload, args.seconds, args.report_every, stop)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            print("chromium is not installed (Debian: apt-get install chromium): no screenshot")
            return
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--hide-scrollbars", "--window-size=1280,1180", f"--user-data-dir={work / 'profile'}",
                        f"--screenshot={args.out}", url + "/status"], check=True, capture_output=True, timeout=120)
    print(f"{args.out}: {Path(args.out).stat().st_size} bytes; alarms raised: {dict(app.state.monitor.alarms)}")


if __name__ == "__main__":
    main()
