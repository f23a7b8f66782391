"""The edge runner: decide ID/OOD on the device, upload only ID inputs to the cloud server."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ._protocol import ENCODINGS, HEADER_BATCH, HEADER_ENCODING, HEADER_VERSION, encode, encoded_size
from ._export import load_split

UPLOADS = ("activations", "raw", "auto")


@dataclass
class EdgeRecord:
    """What happened to one input."""

    index: int
    is_id: bool
    score: float
    uploaded: str  # "activations", "raw" or "" (rejected as OOD: nothing sent)
    bytes_sent: int
    latency_ms: float
    prediction: int  # the cloud's prediction, -1 when nothing was sent
    label: int = -1


def choose_upload(manifest, encoding="float32", uplink_mbit_s=10.0, cloud_gflop_s=1000.0):
    """The cost model's choice for an accepted input: ``"activations"`` or ``"raw"``.

    Edge compute is the same either way, so the choice is the cheaper of
    (payload transfer + cloud part) and (input transfer + whole model).
    """
    payload_shapes = [p["shape"] for p in manifest["payload"]]
    act_bytes = encoded_size(payload_shapes, 1, encoding)
    raw_bytes = encoded_size([manifest["input_shape"]], 1, encoding)
    bps, fps = uplink_mbit_s * 1e6 / 8, cloud_gflop_s * 1e9
    t_act = act_bytes / bps + manifest["flops"]["cloud"] / fps
    t_raw = raw_bytes / bps + manifest["flops"]["full"] / fps
    return "activations" if t_act <= t_raw else "raw"


class EdgeRunner:
    """Runs the exported edge part and talks to ``earlin serve-cloud``.

    Parameters
    ----------
    split_dir : str or Path
        Directory written by :func:`save_split` (the same files as the server's).
    url : str
        Base URL of the cloud server, e.g. ``"http://127.0.0.1:8000"``.
    upload : {"activations", "raw", "auto"}, default="auto"
        What an accepted input sends: the cut activations, the input itself
        (the cloud then runs the whole model), or the cost model's choice
        (:func:`choose_upload`).
    encoding : {"float32", "float16", "int8"}, default="float32"
        Wire encoding of what is sent.
    token : str, default=None
        Bearer token of the server.
    uplink_mbit_s, cloud_gflop_s : float
        For ``upload="auto"``.
    timeout : float, default=30
        Seconds per request.
    key : bytes or str, default=None
        Run only a split signed with this key (see :func:`save_split`).
    """

    def __init__(self, split_dir, url, upload="auto", encoding="float32", token=None,
                 uplink_mbit_s=10.0, cloud_gflop_s=1000.0, timeout=30.0, key=None):
        import httpx

        if upload not in UPLOADS:
            raise ValueError(f"upload must be one of {UPLOADS}; got {upload!r}.")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}; got {encoding!r}.")
        self.manifest, self.edge, _ = load_split(split_dir, parts=("edge",), key=key)
        self.upload = choose_upload(self.manifest, encoding, uplink_mbit_s, cloud_gflop_s) if upload == "auto" else upload
        self.encoding = encoding
        headers = {HEADER_ENCODING: encoding, HEADER_VERSION: self.manifest["version"], HEADER_BATCH: "1",
                   "Content-Type": "application/octet-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def process(self, x, index=0, label=-1):
        """Decide on one input ``(C, H, W)`` and upload it if it is ID."""
        t0 = time.perf_counter()
        x = torch.as_tensor(x, dtype=torch.float32)[None]
        with torch.inference_mode():
            is_id, score, *payload = self.edge(x)
        accepted = bool(is_id[0])
        uploaded, sent, prediction = "", 0, -1
        if accepted:
            uploaded = self.upload
            body = encode(payload if uploaded == "activations" else [x], self.encoding)
            response = self.client.post(f"/v1/{uploaded}", content=body)
            if response.status_code != 200:
                raise RuntimeError(f"cloud server answered {response.status_code}: {response.text}")
            prediction, sent = int(response.json()["predictions"][0]), len(body)
        return EdgeRecord(index, accepted, float(score[0]), uploaded, sent, 1e3 * (time.perf_counter() - t0), prediction, int(label))

    def run(self, inputs, labels=None, log=None):
        """Process a stream of inputs; optionally write one JSON line per input to ``log``.

        Parameters
        ----------
        inputs : iterable of tensors/arrays (C, H, W), or a tensor/array (N, C, H, W)
        labels : iterable of int, default=None
        log : str or Path, default=None

        Returns
        -------
        records : list of EdgeRecord
        """
        labels = [-1] * len(inputs) if labels is None else list(labels)
        records = [self.process(x, i, lab) for i, (x, lab) in enumerate(zip(inputs, labels))]
        if log is not None:
            with open(log, "w") as f:
                for r in records:
                    f.write(json.dumps(asdict(r)) + "\n")
        return records


def read_inputs(source, mean=None, std=None):
    """Inputs for the edge runner from an ``.npz`` file or a directory of images.

    An npz holds ``x`` (uint8 NHWC or float NCHW) and optionally ``y``; image
    files (PNG, JPEG, ...) are read with Pillow. uint8 pixels are scaled to
    [0, 1], then normalized with ``mean``/``std`` (per channel) when given.

    Returns
    -------
    X : torch.Tensor of shape (N, C, H, W), float32
    y : ndarray of shape (N,) or None
    """
    source = Path(source)
    y = None
    if source.is_dir():
        from PIL import Image

        files = sorted(p for p in source.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
        if not files:
            raise ValueError(f"no image files in {source}")
        x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    else:
        data = np.load(source)
        x = data["x"]
        y = data["y"] if "y" in data else None
    if x.dtype == np.uint8:
        X = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 if x.shape[-1] in (1, 3) else torch.from_numpy(x).float() / 255.0
    else:
        X = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if mean is not None:
        X = (X - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return X.contiguous(), y


def summarize(records):
    """Totals of a run: inputs, uploads, bytes sent and latency percentiles."""
    lat = np.array([r.latency_ms for r in records])
    return {
        "inputs": len(records),
        "uploaded": int(sum(bool(r.uploaded) for r in records)),
        "bytes_sent": int(sum(r.bytes_sent for r in records)),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
    }
