"""What an accepted input costs to upload: image files against (compressed) activations, per model.

    python benchmarks/bench_payload.py --data-dir ../shared/data

For each development model cut at the end of its first stage, with the
default detector fitted on the CIFAR-10 train subset: ``split_cost`` on the
first ``--n`` CIFAR-10 test images (``images=`` their camera pixels), i.e.
the mean bytes per input of the PNG and JPEG (quality 90) files, of the cut
activations in float32 / float16 / int8, and of float16 and int8 activations
entropy-coded with Zstandard (level 3, one input per body as the edge runner
sends them), with the top-1 agreement of the reduced payloads with float32;
then ``collaborative_cost`` at 50% OOD (TPR 95%, TNR 87%) with the cheapest
payload against PNG uploads.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args, MODELS, TITLES, camera_sets, first_stage, load_model, load_sets, machine, write_results  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, collaborative_cost, split_cost  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "payload"))
    args = parse_args(p, argv, "payload", models=["resnet20"], n=16)
    _, (P_test, y_test), _ = camera_sets(args.data_dir, max_ood=10, n_noise=10)
    rows = []
    for name in args.models:
        (Xtr, ytr), (Xte, yte), _ = load_sets(args.data_dir, max_ood=10, n_noise=10, model=name)
        model = load_model(args.data_dir, name)
        det = ShallowFeatureOODDetector(model, first_stage(name), device="cpu").fit(Xtr, ytr)
        cost = split_cost(*det.export_split(), Xte[: args.n], yte[: args.n], backbone=model, images=P_test[: args.n])
        print(f"{TITLES[name]}\n{cost}\n", flush=True)
        at_half = {p: collaborative_cost(cost, 0.5, 0.95, 0.87, payload=p, raw="png")
                   for p in ("int8+zstd", "float16+zstd")}
        rows.append({"model": name, "layer": first_stage(name), **cost.to_dict(),
                     "cheapest_bytes_at_50pct_ood": at_half["int8+zstd"].cheapest("bytes_per_input")})

    def kib(b):
        return f"{b / 1024:.1f}"

    lines = [f"Command: `python benchmarks/bench_payload.py --data-dir <data> --n {args.n}`; machine: {machine()['cpu']}",
             "", "Mean KiB per input over the first CIFAR-10 test images; agreement: top-1 of the cloud's output against "
             "float32 activations.", "",
             "| model (cut) | uint8 pixels | PNG | JPEG q90 | activations float32 | float16 | float16 + zstd | int8 | "
             "int8 + zstd | top-1 agreement float16 / int8 | cheapest upload at 50% OOD |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {TITLES[r['model']]} ({r['layer']}) | {kib(r['raw_uint8_bytes'])} | {kib(r['raw_png_bytes'])} | "
            f"{kib(r['raw_jpeg_bytes'])} | {kib(r['payload_float32_bytes'])} | {kib(r['payload_float16_bytes'])} | "
            f"{kib(r['payload_float16_zstd_bytes'])} | {kib(r['payload_int8_bytes'])} | {kib(r['payload_int8_zstd_bytes'])} | "
            f"{100 * r['float16_agreement']:.1f}% / {100 * r['int8_agreement']:.1f}% | {r['cheapest_bytes_at_50pct_ood']} |")
    write_results(args.out, "\n".join(lines), {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
