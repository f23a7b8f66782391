"""The edge part in the runtimes a device runs: bytes, batch-1 latency, decisions, TPR, AUROC, cloud accuracy.

    python benchmarks/bench_edge.py --data-dir ../shared/data

For each development model, the default detector (fitted on the CIFAR-10 train
subset) is saved with every edge format (``save_split(formats=("pt2", "onnx",
"pte", "onnx-int8", "pte-int8"))``): int8 calibrated on 2,048 ID training images
(ranges and the pooled features' bias correction), its threshold set to accept
as many of a fixed random half of the CIFAR-10 test subset (held-out ID) as the
float threshold does, everything reported on the other half and on every OOD
set. Per runtime and
precision (PyTorch eager float; ONNX Runtime float and int8; ExecuTorch XNNPACK
float and int8):

- artifact bytes, and int8 over float;
- batch-1 latency with one thread, p50 and p99 of single calls, the programs run
  in turn round after round (all see the same load), as ratios to the bare float
  prefix in the same runtime; the detector's share of the float edge latency;
- decision agreement with the float scikit-learn detector on the test half and
  every OOD set; TPR on the test half; far-OOD AUROC and TNR at 95% TPR (mean of
  the far-OOD sets); cloud top-1 on the program's payloads.

A plot of the latency ratios goes to ``--plot``.
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (parse_args, FAR_OOD, MODELS, TITLES, calibration_split, first_stage, load_model, load_sets,  # noqa: E402
                    machine, write_results)

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn._device_formats import (FlatEdge, _in_prefix, _Outputs, executorch_program,  # noqa: E402
                                            int8_edge, int8_onnx, onnx_program, strip_metadata)
from earlin_sklearn.edge import load_edge_program  # noqa: E402
from earlin_sklearn.edge._programs import EdgeProgram  # noqa: E402
from earlin_sklearn.metrics import auroc, tnr_at_tpr  # noqa: E402

FORMATS = ("pt2", "onnx", "pte", "onnx-int8", "pte-int8")
PROGRAMS = [("torch", "float32"), ("onnxruntime", "float32"), ("onnxruntime", "int8"), ("executorch", "float32"),
            ("executorch", "int8")]
KEYS = [f"{runtime}/{precision}" for runtime, precision in PROGRAMS]


def bare_prefixes(edge, calibration, example):
    """The backbone prefix alone in each device runtime and precision: what the edge costs without its detector."""
    x = example[:1].contiguous()
    onnx_model = onnx_program(_Outputs(edge.prefix), (example,), ["x"], None, ({0: torch.export.Dim("batch", min=1)},))
    programs = {
        "onnxruntime/float32": ("onnxruntime", strip_metadata(copy.deepcopy(onnx_model)).SerializeToString()),
        "onnxruntime/int8": ("onnxruntime", strip_metadata(int8_onnx(onnx_model, calibration)).SerializeToString()),
        "executorch/float32": ("executorch", executorch_program(_Outputs(edge.prefix), x)),
        "executorch/int8": ("executorch",
                            executorch_program(int8_edge(edge, calibration, x, correct_bias=False).prefix, x)),
    }
    loaded = {}
    for k, (rt, data) in programs.items():
        loaded[k] = EdgeProgram(k, {"runtime": rt, "batch": 1 if rt == "executorch" else None}, data)
        loaded[k].data = data
    return loaded


def head_profile(edge, example, calls):
    """Where the float ONNX edge spends its batch-1 time, by ONNX Runtime's own profiler (one thread).

    Each kernel the session ran is put in one part: the backbone prefix (the
    nodes the exporter attributes to ``edge.prefix``; ONNX Runtime fuses each
    convolution with its ReLU and runs them in its blocked NCHWc layout), the
    detector (pooling and head nodes), or ONNX Runtime's layout reorders
    back to NCHW (for the payload and for the pooling). The profiler adds its
    own cost to every kernel, so the microseconds are larger than unprofiled
    runs; the node counts and the split are what matter.
    """
    import json

    import onnxruntime as ort

    x = example[:1].contiguous()
    model = onnx_program(FlatEdge(edge), (x,), ["x"], None, None)
    part = {n.name: ("prefix" if _in_prefix(n) else "detector") for n in model.graph.node}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "edge")
        session = ort.InferenceSession(strip_metadata(model).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(calls):
            session.run(None, {"x": x.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    profile = {k: {"kernels": set(), "us": 0.0} for k in ("prefix", "detector", "reorder")}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        kind = part.get(node) or ("reorder" if e["args"].get("op_name") == "ReorderOutput" else "prefix")
        profile[kind]["kernels"].add(node)
        profile[kind]["us"] += e["dur"] / calls
    return {k: {"kernels": len(v["kernels"]), "us": v["us"]} for k, v in profile.items()}


def latencies(fns, rounds, calls):
    """p50 and p99 (ms) of single batch-1 calls; the functions run in turn, ``calls`` each, ``rounds`` times."""
    samples = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for k, fn in fns.items():
                for _ in range(3):  # warm: caches and branch predictors of this program, not the previous one's
                    fn()
                for _ in range(calls):
                    t0 = time.perf_counter_ns()
                    fn()
                    samples[k].append(time.perf_counter_ns() - t0)
    return {k: (float(np.percentile(v, 50)) / 1e6, float(np.percentile(v, 99)) / 1e6) for k, v in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--max-ood", type=int, default=1000)
    p.add_argument("--calibration", type=int, default=2048,
                   help="ID training images that set the int8 ranges and bias correction")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "edge"))
    p.add_argument("--plot", default=str(Path(__file__).parents[1] / "docs" / "_static" / "edge_latency.png"))
    args = parse_args(p, argv, "edge", models=["resnet20"], max_ood=16, rounds=2, calls=3, calibration=16, plot=None)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {"machine": machine(), "args": vars(args), "models": {}}
    rows = []
    for name in args.models:
        (Xtr, ytr), (Xte, yte), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood, model=name)
        model = load_model(args.data_dir, name)
        det = ShallowFeatureOODDetector(model, first_stage(name), device="cpu").fit(Xtr, ytr)
        cal_idx, eval_idx = calibration_split(len(Xte))
        X_eval = Xte[eval_idx].contiguous()
        calibration = Xtr[: args.calibration]
        edge, cloud = det.export_split()
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            paths = save_split(edge, cloud, folder, Xte[:2], formats=FORMATS, calibration=calibration,
                               threshold_data=Xte[cal_idx])
            export_s = time.perf_counter() - t0
            size = {k: Path(v).stat().st_size for k, v in paths.items()}
            programs = {f"{rt}/{pr}": load_edge_program(folder, rt, pr)[1] for rt, pr in PROGRAMS}
            cloud_module = torch.export.load(Path(folder) / "cloud.pt2").module()
        prefixes = bare_prefixes(edge, calibration, Xte[:2].contiguous())
        profile = head_profile(edge, Xte[:2], max(args.calls, 20))
        # the runtime call itself for every program (EdgeProgram._run: no output conversion), torch eager as the
        # exported modules run in Python: the edge module against its bare prefix
        x1 = X_eval[:1].contiguous()
        fns = {"prefix torch/float32": lambda: edge.prefix(x1), "edge torch/float32": lambda: edge(x1)}
        for key, program in programs.items():
            if not key.startswith("torch"):
                fns[f"edge {key}"] = (lambda run=program._run, a=x1.numpy(): run(a))
                fns[f"prefix {key}"] = (lambda run=prefixes[key]._run, a=x1.numpy(): run(a))
        lat = latencies(fns, args.rounds, args.calls)
        # decisions and scores of every program on ID (held-out half) and every OOD set
        sets = {"CIFAR-10 test": X_eval, **ood}
        ref = {s: det.score_samples(X.numpy()) for s, X in sets.items()}
        with torch.inference_mode():
            top1_ref = model(X_eval).argmax(1)
        model_rows = {}
        for key, program in programs.items():
            out = {s: program(X.numpy()) for s, X in sets.items()}
            agree = np.mean(np.concatenate([out[s][0] == (ref[s] >= det.offset_) for s in sets]))
            far = [s for s in FAR_OOD if s in sets]
            id_score = out["CIFAR-10 test"][1]
            with torch.inference_mode():
                logits = cloud_module(*[torch.from_numpy(t) for t in out["CIFAR-10 test"][2]])
            runtime, precision = key.split("/")
            prefix_key = key
            float_prefix = lat[f"prefix {runtime}/float32"][0]
            row = {
                "file": program.name, "bytes": size[program.name],
                "p50_ms": lat[f"edge {key}"][0], "p99_ms": lat[f"edge {key}"][1],
                "prefix_p50_ms": lat[f"prefix {prefix_key}"][0],
                "edge_vs_float_prefix": lat[f"edge {key}"][0] / float_prefix,
                "prefix_vs_float_prefix": lat[f"prefix {prefix_key}"][0] / float_prefix,
                "detector_share": max(0.0, lat[f"edge {key}"][0] - lat[f"prefix {prefix_key}"][0]) / lat[f"edge {key}"][0],
                "agreement": float(agree),
                "tpr": float(np.mean(out["CIFAR-10 test"][0])),
                "far_auroc": float(np.mean([auroc(id_score, out[s][1]) for s in far])),
                "far_tnr95": float(np.mean([tnr_at_tpr(id_score, out[s][1]) for s in far])),
                "cloud_top1": float((logits.argmax(1) == yte[eval_idx]).float().mean()),
                "cloud_agrees_with_model": float((logits.argmax(1) == top1_ref).float().mean()),
            }
            model_rows[key] = row
            rows.append((name, key, row))
        for runtime in ("onnxruntime", "executorch"):
            model_rows[f"{runtime}/int8"]["bytes_vs_float"] = (
                model_rows[f"{runtime}/int8"]["bytes"] / model_rows[f"{runtime}/float32"]["bytes"])
        calibrated = copy.deepcopy(det).calibrate_threshold(Xte[cal_idx].numpy())
        results["models"][name] = {"export_s": export_s, "sizes": size, "programs": model_rows, "profile": profile,
                                   "prefix_bytes": {k: len(p.data) for k, p in prefixes.items()},
                                   "float_tpr_sklearn": float(np.mean(ref["CIFAR-10 test"] >= det.offset_)),
                                   "float_tpr_calibrated": float(np.mean(calibrated.predict(X_eval.numpy()) == 1)),
                                   # what setting a threshold of its own for the target TPR alone moves
                                   "float_agreement_calibrated": float(np.mean(np.concatenate(
                                       [(calibrated.score_samples(X.numpy()) >= calibrated.offset_)
                                        == (ref[s] >= det.offset_) for s, X in sets.items()]))),
                                   "target_tpr": det.target_tpr,
                                   "float_far_auroc_sklearn": float(np.mean([auroc(ref["CIFAR-10 test"], ref[s])
                                                                             for s in FAR_OOD if s in ref]))}
        print(f"{TITLES[name]}: exported every format in {export_s:.1f} s", flush=True)

    head = ("| model | runtime | precision | bytes | int8/float bytes | p50 ms | p99 ms | edge / float prefix | "
            "detector share | agreement % | TPR % | far AUROC % | far TNR@95 % | cloud top-1 % |")
    lines = [f"Command: `python benchmarks/bench_edge.py --data-dir <data>`; machine: {machine()['cpu']}, "
             f"{machine()['cores']} cores, one thread; {args.rounds} rounds x {args.calls} calls per program.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for name, key, r in rows:
        runtime, precision = key.split("/")
        lines.append(f"| {TITLES[name]} | {runtime} | {precision} | {r['bytes']:,} | "
                     f"{'%.2f' % r['bytes_vs_float'] if 'bytes_vs_float' in r else '-'} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['edge_vs_float_prefix']:.2f} | "
                     f"{'%.1f%%' % (100 * r['detector_share']) if precision == 'float32' else '-'} | "
                     f"{100 * r['agreement']:.2f} | {100 * r['tpr']:.1f} | {100 * r['far_auroc']:.2f} | "
                     f"{100 * r['far_tnr95']:.1f} | {100 * r['cloud_top1']:.1f} |")
    lines += ["", "Bare prefix p50 (ms) in each runtime and precision, and int8 prefix over float prefix:", "",
              "| model | " + " | ".join(f"{k}" for k in KEYS) + " |",
              "|---|" + "---|" * len(KEYS)]
    for name in args.models:
        progs = results["models"][name]["programs"]
        lines.append(f"| {TITLES[name]} | " + " | ".join(
            f"{progs[k]['prefix_p50_ms']:.3f} ({progs[k]['prefix_vs_float_prefix']:.2f}x)" for k in KEYS) + " |")
    lines += ["", "Bare prefix bytes: " + "; ".join(
        f"{TITLES[n]} " + ", ".join(f"{k} {v:,}" for k, v in results["models"][n]["prefix_bytes"].items())
        for n in args.models) + ".",
        "", "scikit-learn float detector on the same test half: " + "; ".join(
        f"{TITLES[n]} TPR {100 * results['models'][n]['float_tpr_sklearn']:.1f}% (threshold from the training "
        f"subset), {100 * results['models'][n]['float_tpr_calibrated']:.1f}% (threshold set for the target TPR on "
        f"the other half, int8_threshold='target_tpr', which alone agrees with the former on "
        f"{100 * results['models'][n]['float_agreement_calibrated']:.2f}% of the inputs), far AUROC "
        f"{100 * results['models'][n]['float_far_auroc_sklearn']:.2f}%"
        for n in args.models) + ".",
        "", "Where the float ONNX edge spends its batch-1 time, by ONNX Runtime's profiler (kernels run, profiled "
        "microseconds per call, which the profiler inflates by a few microseconds per kernel) and, unprofiled, the "
        "float edge's p50 minus its bare prefix's p50 over the detector's kernels:", "",
        "| model | prefix kernels | prefix us (profiled) | detector kernels | detector us (profiled) | reorders | "
        "reorder us (profiled) | detector us unprofiled | per detector kernel |", "|---|---|---|---|---|---|---|---|---|"]
    for n in args.models:
        pr = results["models"][n]["profile"]
        ort_float = results["models"][n]["programs"]["onnxruntime/float32"]
        unprofiled = 1000 * (ort_float["p50_ms"] - ort_float["prefix_p50_ms"])
        lines.append(f"| {TITLES[n]} | {pr['prefix']['kernels']} | {pr['prefix']['us']:.1f} | "
                     f"{pr['detector']['kernels']} | {pr['detector']['us']:.1f} | {pr['reorder']['kernels']} | "
                     f"{pr['reorder']['us']:.1f} | {unprofiled:.1f} | "
                     f"{unprofiled / max(pr['detector']['kernels'], 1):.2f} |")
    write_results(args.out, "\n".join(lines), results)
    if args.plot:
        plot(results, args.plot)


def plot(results, path):
    """Batch-1 p50 latency of each program as a ratio to the float prefix in its runtime, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    keys = KEYS
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [results["models"][m]["programs"][key]["edge_vs_float_prefix"] for m in models]
        ax.bar(np.arange(len(models)) + i * width, values, width, label=key.replace("/", " "))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, [TITLES[m] for m in models])
    ax.set_ylabel("edge latency / float prefix")
    ax.set_title("Batch-1 edge latency (one thread), relative to the bare float prefix in the same runtime")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
