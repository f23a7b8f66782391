"""Feature cache for the detector exploration (benchmarks/explore_detector.py).

    python benchmarks/explore_cache.py --data-dir ../shared/data --out /tmp/earlin_explore

For each development model, runs every ID, pseudo-OOD and real OOD image once
through the edge prefix (the blocks up to the end of the first stage) and
stores, for every block output inside it, per-channel statistics: mean,
standard deviation, maximum, skewness and the channel Gram matrix (upper
triangle). The exploration then fits detectors on these in numpy in seconds.

Protocol: the ID training subset is split into ``fit`` (the first 80%) and
``val`` (the last 20%); pseudo-OOD is made from ``val`` only. Choices are made
on ``fit``/``val``/pseudo-OOD; the ID test subset and the real OOD sets are
cached for reporting only.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args, MODELS, load_model, load_sets  # noqa: E402

from earlin_sklearn import make_pseudo_ood  # noqa: E402


def taps(model_key, model):
    """Block outputs inside the edge prefix, in execution order (the last is the end of stage 1)."""
    if model_key.startswith("resnet"):
        return ["relu"] + [f"layer1.{i}" for i in range(len(model.layer1))]
    return ["conv1"] + [f"stage2.{i}" for i in range(len(model.stage2))]


class _Stop(Exception):
    pass


def tap_stats(a):
    n, c = a.shape[:2]
    flat = a.reshape(n, c, -1).double()
    mean = flat.mean(2)
    cen = flat - mean[:, :, None]
    var = cen.square().mean(2)
    std = var.sqrt()
    skew = cen.pow(3).mean(2) / (var.pow(1.5) + 1e-12)
    mx = flat.amax(2)
    gram = torch.einsum("nch,ndh->ncd", flat, flat) / flat.shape[2]
    iu = torch.triu_indices(c, c)
    return {"mean": mean, "std": std, "max": mx, "skew": skew, "gram": gram[:, iu[0], iu[1]]}


def extract(model, names, X, batch_size=256):
    outs = {}
    mods = dict(model.named_modules())

    def hook(name, last):
        def f(mod, args, out):
            outs[name] = out
            if last:
                raise _Stop
        return f

    handles = [mods[n].register_forward_hook(hook(n, i == len(names) - 1)) for i, n in enumerate(names)]
    res = {n: {} for n in names}
    try:
        with torch.inference_mode():
            for s in range(0, len(X), batch_size):
                outs.clear()
                try:
                    model(X[s : s + batch_size])
                except _Stop:
                    pass
                for n in names:
                    for k, v in tap_stats(outs[n]).items():
                        res[n].setdefault(k, []).append(v.numpy())
    finally:
        for h in handles:
            h.remove()
    return {n: {k: np.concatenate(v) for k, v in d.items()} for n, d in res.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--max-ood", type=int, default=1000)
    p.add_argument("--out", default="/tmp/earlin_explore")
    args = parse_args(p, argv, "explore_cache", models=["resnet20"], max_ood=16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for key in args.models:
        t0 = time.time()
        (Xtr, ytr), (Xte, yte), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood, model=key)
        n_fit = int(0.8 * len(Xtr))
        val = Xtr[n_fit:].numpy()
        pseudo = {f"pseudo-{k}": torch.from_numpy(make_pseudo_ood(val, k, 0)) for k in ("shuffle", "blur", "noise")}
        model = load_model(args.data_dir, key)
        names = taps(key, model)
        sets = {"train": Xtr, "test": Xte, **pseudo, **ood}
        arrays = {"y_train": ytr.numpy(), "y_test": yte.numpy(), "n_fit": np.array(n_fit), "taps": np.array(names)}
        for set_name, X in sets.items():
            stats = extract(model, names, X)
            for tap, d in stats.items():
                for stat, v in d.items():
                    arrays[f"{set_name}|{tap}|{stat}"] = v.astype(np.float32)
        np.savez(out / f"{key}.npz", **arrays)
        print(f"{key}: taps {names}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
