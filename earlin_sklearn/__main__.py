"""Command line (also installed as ``earlin``).

``python -m earlin_sklearn demo``: the offline end-to-end demo.
``earlin serve-cloud SPLIT_DIR``: serve the cloud part of an exported split.
``earlin run-edge SPLIT_DIR --input DATA``: run the edge part, upload ID inputs.
"""

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from ._constants import CLOUD_RUNTIMES, COMPRESSIONS, DEMO_LAYERS, ENCODINGS, IMAGE_FORMATS, UPLOADS


def _secret_options(sub_parser):
    sub_parser.add_argument("--token-file", help="read the bearer token from this file (keeps it out of `ps`)")
    sub_parser.add_argument("--key", default=os.environ.get("EARLIN_SPLIT_KEY"), help=argparse.SUPPRESS)
    sub_parser.add_argument("--key-file", help="accept only a split signed with the key in this file "
                                               "(save_split(..., key=...); default: $EARLIN_SPLIT_KEY, or none)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="earlin", description="EARLIN early OOD detection.")
    parser.add_argument("--version", action="version", version=f"earlin_sklearn {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (torch: default half the cores, at least 1; run-edge's runtime: 1)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole method offline on scikit-learn's digits")
    demo.add_argument("--layer", default="layer1", choices=DEMO_LAYERS, help="detection layer of the demo CNN")
    demo.add_argument("--seed", type=int, default=0)

    serve = sub.add_parser("serve-cloud", help="serve the exported cloud part over HTTP")
    serve.add_argument("split_dir", help="directory written by earlin_sklearn.save_split")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--token", default=os.environ.get("EARLIN_TOKEN"),
                       help="require 'Authorization: Bearer TOKEN' (default: $EARLIN_TOKEN, or none)")
    serve.add_argument("--max-bytes", type=int, default=64 * 2**20,
                       help="largest request body (also capped at the largest valid body)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a client may take to send a request's headers (slow-loris clients)")
    serve.add_argument("--batch-inputs", type=int, default=64,
                       help="dynamic batching: most inputs of concurrent requests run as one batch of the cloud part")
    serve.add_argument("--max-wait-ms", type=float, default=2.0,
                       help="how long a request waits for batch-mates (0: run as it comes)")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="inputs that may wait for a batch; beyond, 503 with Retry-After")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes (uvicorn's), each with the split loaded; /metrics sums them")
    serve.add_argument("--graceful-seconds", type=float, default=30.0,
                       help="on SIGTERM/SIGINT, how long requests in flight may take to finish")
    serve.add_argument("--runtime", choices=CLOUD_RUNTIMES, default="torch",
                       help="run the split's .pt2 parts in PyTorch, or its cloud.onnx (and edge.onnx for raw inputs) "
                            "in ONNX Runtime: no Python between operators, batches run beside the event loop")
    serve.add_argument("--no-access-log", action="store_true",
                       help="no log line per request (/metrics counts them)")
    serve.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    for sub_parser in (serve,):
        _secret_options(sub_parser)

    edge = sub.add_parser("run-edge", help="run the exported edge part on a stream, upload ID inputs")
    edge.add_argument("split_dir", help="directory written by earlin_sklearn.save_split")
    edge.add_argument("--url", default="http://127.0.0.1:8000", help="the cloud server")
    edge.add_argument("--input", required=True, help="an .npz file (x, optional y) or a directory of images")
    edge.add_argument("--mean", type=float, nargs="+", help="per-channel mean to normalize uint8 images (after /255)")
    edge.add_argument("--std", type=float, nargs="+", help="per-channel std to normalize uint8 images")
    edge.add_argument("--upload", choices=UPLOADS, default="auto",
                      help="what an accepted input sends: the cut activations, the input itself, or the cost "
                           "model's choice (auto)")
    edge.add_argument("--encoding", choices=ENCODINGS + IMAGE_FORMATS, default="float32",
                      help="tensor encoding, or png/jpeg: upload the camera image (needs a split with preprocessing)")
    edge.add_argument("--compression", choices=COMPRESSIONS, default="none",
                      help="entropy-code tensor bodies (zstd: pip install zstandard, on both sides)")
    edge.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of --encoding jpeg uploads")
    edge.add_argument("--token", default=os.environ.get("EARLIN_TOKEN"),
                      help="the server's bearer token (default: $EARLIN_TOKEN, or none)")
    edge.add_argument("--log", default="edge_log.jsonl", help="one JSON line per input, written as it goes")
    edge.add_argument("--resume", action="store_true", help="continue from --log: skip inputs already processed")
    edge.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    edge.add_argument("--retries", type=int, default=5, help="retries per upload (timeouts, disconnects, 5xx)")
    edge.add_argument("--wait", type=float, default=0.0,
                      help="seconds to wait for the server to come up (its /health is checked before the first "
                           "input: down, wrong token or another split fail at once)")
    edge.add_argument("--allow-all-ood", action="store_true",
                      help="exit 0 when every input is judged OOD (by default that ends with a warning and exit "
                           "code 3: it usually means unnormalized or wrongly shaped inputs)")
    edge.add_argument("--runtime", choices=("auto", "executorch", "onnxruntime", "torch"), default="auto",
                      help="which edge file runs: ExecuTorch (.pte), ONNX Runtime (.onnx) or PyTorch (.pt2); auto: "
                           "the first of these the split has and this machine can run (only torch imports PyTorch)")
    edge.add_argument("--precision", choices=("auto", "float32", "int8"), default="auto",
                      help="auto: the split's int8 edge for that runtime when it has one")
    edge.add_argument("--report-every", type=int, default=100,
                      help="send the server this device's counts every N inputs (drift alarms; 0: never)")
    edge.add_argument("--device", help="the id the reports carry (default: the host name)")
    _secret_options(edge)
    args = parser.parse_args(argv)
    for name in ("token", "key"):
        path = getattr(args, f"{name}_file", None)
        if path:
            try:
                setattr(args, name, Path(path).read_text().strip())
            except OSError as exc:
                parser.error(f"--{name}-file: {exc}")
    if getattr(args, "token", None) == "":
        parser.error("the token is empty (is $EARLIN_TOKEN set?): pass the token, or leave --token out for none")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.command != "run-edge":  # the edge runner imports no torch: its runtime takes the thread count
        import torch

        from ._torch import default_threads

        torch.set_num_threads(args.threads or default_threads())
    if args.command == "demo":
        from ._demo import run_demo

        run_demo(layer=args.layer, seed=args.seed)
    elif args.command == "serve-cloud":
        from ._optional import require

        try:
            require("earlin serve-cloud", "serve", "fastapi", "uvicorn", "prometheus_client")
        except ImportError as exc:
            print(f"earlin: {exc}", file=sys.stderr)
            return 2
        from ._server import serve

        if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
            parser.error("--ssl-certfile and --ssl-keyfile go together")
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        serve(args.split_dir, host=args.host, port=args.port, token=args.token, max_bytes=args.max_bytes, key=args.key,
              ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, header_timeout=args.header_timeout,
              batch_inputs=args.batch_inputs, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
              workers=args.workers, graceful_seconds=args.graceful_seconds, runtime=args.runtime,
              access_log=not args.no_access_log)
    elif args.command == "run-edge":
        if (args.mean is None) != (args.std is None):
            parser.error("--mean and --std go together")
        from ._optional import require

        try:
            require("earlin run-edge", "edge", "httpx")
        except ImportError as exc:
            print(f"earlin: {exc}", file=sys.stderr)
            return 2
        from .edge import CloudRefused, CloudUnreachable, EdgeRunner, read_inputs, summarize
        from .exceptions import SplitVerificationError

        images = args.encoding in IMAGE_FORMATS
        try:
            X, y = read_inputs(args.input)
            with EdgeRunner(args.split_dir, args.url, upload="raw" if images else args.upload, encoding=args.encoding,
                            token=args.token, key=args.key, timeout=args.timeout, retries=args.retries,
                            jpeg_quality=args.jpeg_quality, compression=args.compression, runtime=args.runtime,
                            precision=args.precision, threads=args.threads or 1, mean=args.mean,
                            std=args.std, report_every=args.report_every, device=args.device) as runner:
                print(f"earlin run-edge: {runner.program.name} ({runner.program.runtime}, {runner.program.precision})",
                      file=sys.stderr)
                runner.check_server(wait=args.wait, timeout=min(5.0, args.timeout))
                records = runner.run(X, labels=y, log=args.log, resume=args.resume)
        except (CloudRefused, CloudUnreachable, ValueError, FileNotFoundError, ImportError,
                SplitVerificationError) as exc:
            print(f"earlin run-edge: {exc}", file=sys.stderr)
            return 2
        summary = summarize(records)
        print(f"{summary['inputs']} inputs, {summary['uploaded']} uploaded ({runner.upload}, {args.encoding}"
              f"{'' if args.compression == 'none' else '+' + args.compression}), "
              f"{summary['failed']} failed, {summary['bytes_sent']} bytes sent, latency p50 "
              f"{summary['latency_p50_ms']:.2f} ms, p95 {summary['latency_p95_ms']:.2f} ms; log: {args.log}")
        if summary["failed"]:
            print(f"earlin run-edge: {summary['failed']} uploads failed after every retry; rerun with --resume "
                  "to retry only those.", file=sys.stderr)
            return 1
        if summary["inputs"] and summary["rejected"] == summary["inputs"] and not args.allow_all_ood:
            print(f"earlin run-edge: warning: every one of the {summary['inputs']} inputs was judged OOD, nothing was "
                  "uploaded. If they are in-distribution images, check how they are normalized (the split's "
                  "preprocessing, or --mean/--std) and their shape; pass --allow-all-ood when this is expected.",
                  file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
