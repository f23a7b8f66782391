"""Exploration for the two-stage detector's cloud stage: which full-model score catches near OOD.

    python benchmarks/explore_cloud_scores.py --data-dir ../shared/data

The cloud part computes the whole model for every uploaded input, so its
detector can read the penultimate features ``z`` (the classifier's input) and
the logits at no extra cost. Candidates, each "higher = more ID":

- logit scores: energy (logsumexp), max logit, MSP;
- feature scores: KNN (Sun et al. 2022: minus the distance to the k-th
  nearest L2-normalized training feature), class-conditional Mahalanobis with
  a shared covariance, ViM (Wang et al. 2022: energy minus a scaled norm of
  the feature's residual outside the training features' principal
  subspace, measured from the classifier's origin ``-pinv(W) b``), fDBD (Liu
  & Qin 2024: mean distance to the decision boundaries of the predicted
  class, over the feature's distance to the training mean);
- combinations: the sum of two scores, each standardized by its mean and
  standard deviation on held-out ID images (no OOD data);
- test-time flip (``(flip)``): energy, KNN and their sum scored as the mean
  over the image and its mirror image. The cloud then runs the model twice,
  and it needs the image: a split's activation payload cannot be flipped
  (the prefix's convolutions are not mirror-symmetric).

Two columns per candidate:

- **choice** (ID data only): held-out classes. Fold k leaves classes 2k and
  2k + 1 out of everything the candidate reads: their logits and rows of the
  classifier, their training features; the standardization and the ID are
  the other classes' images of the held-out half, the OOD the left-out
  classes' images of the evaluation half. The model itself was trained on all
  ten classes, so this is a proxy of "a class the classifier does not have",
  not a refit.
- **report**: CIFAR-100 (the 916-image subset) and the far-OOD mean AUROC,
  ID = the evaluation half of the CIFAR-10 test subset (the other half
  standardizes the combinations). Printed beside the choice, never used for it.

An exploration, not a benchmark of the package: it computes every score in
numpy here, to choose what the package's cloud stage should export.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (FAR_OOD, MODELS, TITLES, calibration_split, load_model, load_npz, load_sets,  # noqa: E402
                    normalize_unit, parse_args, to_unit, write_results, machine)

from earlin_sklearn.metrics import auroc  # noqa: E402

SINGLE = ["energy", "maxlogit", "msp", "gen", "react", "knn", "knn10", "knn1", "mahalanobis", "vim", "fdbd",
          "nnguide"]
PAIRS = [("energy", "knn"), ("energy", "knn10"), ("energy", "fdbd"), ("energy", "mahalanobis"), ("maxlogit", "knn"),
         ("energy", "vim"), ("knn", "fdbd"), ("msp", "knn"), ("gen", "knn"), ("react", "knn"), ("energy", "nnguide"),
         ("gen", "knn10"), ("react", "knn10")]
# also scored with a test-time horizontal flip (the cloud runs the model twice; needs the image, not activations)
FLIP = ["energy", "knn10"]
FLIP_PAIRS = [("energy", "knn10")]
FULL_MODEL_BASELINES = ["energy", "maxlogit", "msp", "knn", "vim"]  # the "best single full-model score"


def classifier(model):
    """The model's last linear layer (its input is the penultimate feature)."""
    return model.linear if hasattr(model, "linear") else model.fc


def features_and_logits(model, X, batch_size=256):
    fc, got = classifier(model), []
    handle = fc.register_forward_hook(lambda m, inp, out: got.append(inp[0].detach().double()))
    logits = []
    try:
        with torch.inference_mode():
            for i in range(0, len(X), batch_size):
                logits.append(model(X[i:i + batch_size]).double())
    finally:
        handle.remove()
    return torch.cat(got).numpy(), torch.cat(logits).numpy()


class Scores:
    """Every candidate fitted on training features ``z`` (labels ``y``) and a classifier ``W``, ``b`` restricted
    to ``classes``."""

    def __init__(self, z, y, W, b, classes, k=50):
        keep = np.isin(y, classes)
        self.z, self.y, self.W, self.b, self.k = z[keep], y[keep], W[classes], b[classes], k
        self.bank = self.z / np.linalg.norm(self.z, axis=1, keepdims=True)
        self.mean = self.z.mean(0)
        mu = np.stack([self.z[self.y == c].mean(0) for c in classes])
        cen = self.z - mu[np.searchsorted(classes, self.y)]
        self.mu, self.prec = mu, np.linalg.pinv(cen.T @ cen / len(cen))
        # ViM: principal subspace of the training features around the classifier's origin
        self.origin = -np.linalg.pinv(self.W) @ self.b
        centred = self.z - self.origin
        _, vecs = np.linalg.eigh(centred.T @ centred / len(centred))
        dim = z.shape[1] // 2 if z.shape[1] > 128 else max(z.shape[1] // 2, 1)
        self.null = vecs[:, : z.shape[1] - dim]  # eigenvalues ascending: the smallest directions
        logits = self.z @ self.W.T + self.b
        residual = np.linalg.norm(centred @ self.null, axis=1)
        self.alpha = logits.max(1).mean() / residual.mean()
        self.clip = np.quantile(self.z, 0.9)  # ReAct: activations clipped at the 90th percentile of the training ones
        e = self._energy(logits)
        self.guide = self.bank * e[:, None]  # NNGuide: the bank scaled by each training image's confidence

    @staticmethod
    def _energy(lg):
        m = lg.max(1)
        return m + np.log(np.exp(lg - m[:, None]).sum(1))

    def logits(self, z):
        return z @ self.W.T + self.b

    def __call__(self, name, z):
        lg = self.logits(z)
        if name == "energy":
            return self._energy(lg)
        if name == "react":
            return self._energy(self.logits(np.minimum(z, self.clip)))
        if name == "gen":  # Liu et al. 2023, gamma 0.1 over all classes: minus the generalized entropy
            e = np.exp(lg - lg.max(1, keepdims=True))
            prob = e / e.sum(1, keepdims=True)
            return -(prob ** 0.1 * (1 - prob) ** 0.1).sum(1)
        if name == "nnguide":  # Park et al. 2023: energy times the mean similarity to the 10 nearest guides
            q = z / np.linalg.norm(z, axis=1, keepdims=True)
            sim = q @ self.guide.T
            return self._energy(lg) * np.sort(np.partition(sim, -10, axis=1)[:, -10:], axis=1).mean(1)
        if name == "maxlogit":
            return lg.max(1)
        if name == "msp":
            e = np.exp(lg - lg.max(1, keepdims=True))
            return (e / e.sum(1, keepdims=True)).max(1)
        if name.startswith("knn"):
            k = int(name[3:] or self.k)
            q = z / np.linalg.norm(z, axis=1, keepdims=True)
            d = np.sqrt(np.maximum(2 - 2 * q @ self.bank.T, 0))
            return -np.partition(d, k - 1, axis=1)[:, k - 1]
        if name == "mahalanobis":
            diff = z[:, None, :] - self.mu[None]
            return -((diff @ self.prec) * diff).sum(2).min(1)
        if name == "vim":
            return self("energy", z) - self.alpha * np.linalg.norm((z - self.origin) @ self.null, axis=1)
        if name == "fdbd":
            c = lg.argmax(1)
            gaps = lg[np.arange(len(z)), c][:, None] - lg  # (w_c - w_j) . z + b_c - b_j >= 0
            norms = np.linalg.norm(self.W[c][:, None, :] - self.W[None], axis=2)  # (n, classes)
            mask = np.ones_like(gaps, dtype=bool)
            mask[np.arange(len(z)), c] = False
            dist = (gaps / np.where(mask, norms, 1.0))[mask].reshape(len(z), -1).mean(1)
            return dist / np.linalg.norm(z - self.mean, axis=1)
        raise ValueError(name)


def candidate_scores(scores, norm, sets):
    """Every candidate's scores of each set in ``sets`` (name -> ``(features, features of the flipped images)``);
    pairs standardized on ``norm`` (the same pair for the standardization images)."""
    single = {name: {s: scores(name, z) for s, (z, _) in sets.items()} for name in SINGLE}
    ref = {name: scores(name, norm[0]) for name in SINGLE}
    for name in FLIP:  # test-time flip: the mean of the image's and its mirror image's scores
        single[f"{name} (flip)"] = {s: (scores(name, z) + scores(name, zf)) / 2 for s, (z, zf) in sets.items()}
        ref[f"{name} (flip)"] = (scores(name, norm[0]) + scores(name, norm[1])) / 2
    out = dict(single)
    for a, b in PAIRS + [(f"{a} (flip)", f"{b} (flip)") for a, b in FLIP_PAIRS]:
        out[f"{a}+{b}"] = {s: (single[a][s] - ref[a].mean()) / ref[a].std() + (single[b][s] - ref[b].mean())
                           / ref[b].std() for s in sets}
    return out


def held_out_classes(z_train, y_train, W, b, z_test, y_test, cal, ev, n_folds=5):
    """Per candidate, the mean AUROC over folds of seen classes (ID) against two left-out ones (OOD); ``z_test`` is
    the pair (features, features of the flipped images)."""
    classes = np.unique(y_train)
    per = {}
    for k in range(n_folds):
        out = classes[2 * k: 2 * k + 2]
        seen = np.setdiff1d(classes, out)
        scores = Scores(z_train, y_train, W, b, seen)

        def part(idx, cls):
            keep = idx[np.isin(y_test[idx], cls)]
            return z_test[0][keep], z_test[1][keep]

        norm = part(cal, seen)
        sets = {"id": part(ev, seen), "ood": part(ev, out)}
        if len(sets["ood"][0]) == 0 or len(sets["id"][0]) == 0:
            continue
        for name, s in candidate_scores(scores, norm, sets).items():
            per.setdefault(name, []).append(auroc(s["id"], s["ood"]))
    return {name: float(np.mean(v)) for name, v in per.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--max-ood", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "explore" / "cloud_scores"))
    args = parse_args(p, argv, "explore_cloud_scores", models=["resnet20"], max_ood=16)
    results = {}
    for name in args.models:
        (Xtr, ytr), (Xte, yte), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood,
                                                model=name)
        ood.pop("CIFAR-100")  # the 148-image subset; the 916 one below
        ood["CIFAR-100"] = normalize_unit(to_unit(load_npz(args.data_dir, "cifar100_test_partial916.npz")["x"]), name)
        model = load_model(args.data_dir, name).eval()
        fc = classifier(model)
        W, b = fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()
        z_train, _ = features_and_logits(model, Xtr)
        z_test, logits_test = features_and_logits(model, Xte)
        z_test_flip = features_and_logits(model, Xte.flip(3))[0]
        np.testing.assert_allclose(z_test @ W.T + b, logits_test, rtol=1e-4, atol=1e-4)  # the hook saw fc's input
        y_train, y_test = ytr.numpy(), yte.numpy()
        cal, ev = calibration_split(len(z_test))
        z_ood = {s: (features_and_logits(model, X)[0], features_and_logits(model, X.flip(3))[0])
                 for s, X in ood.items()}
        scores = Scores(z_train, y_train, W, b, np.unique(y_train))
        got = candidate_scores(scores, (z_test[cal], z_test_flip[cal]), {"id": (z_test[ev], z_test_flip[ev]), **z_ood})
        choice = held_out_classes(z_train, y_train, W, b, (z_test, z_test_flip), y_test, cal, ev)
        far = [s for s in FAR_OOD if s in z_ood]
        results[name] = {c: {"held_out_classes": choice[c], "cifar100": auroc(v["id"], v["CIFAR-100"]),
                             "far": float(np.mean([auroc(v["id"], v[s]) for s in far]))} for c, v in got.items()}
    lines = [f"Command: `python benchmarks/explore_cloud_scores.py --data-dir <data>`; machine: {machine()['cpu']}",
             "", "AUROC % of each cloud-stage candidate: held-out classes (the ID-only choice) / CIFAR-100 916 / "
             "far-OOD mean. ID: half of the CIFAR-10 test subset (the other half standardizes the sums).", "",
             "| candidate | " + " | ".join(TITLES[n] for n in args.models) + " | mean choice |",
             "|---|" + "---|" * (len(args.models) + 1)]
    for c in results[args.models[0]]:
        cells = [" / ".join(f"{100 * results[n][c][k]:.1f}" for k in ("held_out_classes", "cifar100", "far"))
                 for n in args.models]
        lines.append(f"| {c} | " + " | ".join(cells)
                     + f" | {100 * np.mean([results[n][c]['held_out_classes'] for n in args.models]):.1f} |")
    best = {n: max(results[n][c]["cifar100"] for c in FULL_MODEL_BASELINES) for n in args.models}
    chosen = max(results[args.models[0]], key=lambda c: np.mean([results[n][c]["held_out_classes"]
                                                                   for n in args.models]))
    lines += ["", f"Chosen by held-out classes: {chosen}; its CIFAR-100 AUROC minus the best single full-model "
              "score's (" + ", ".join(FULL_MODEL_BASELINES) + "): " + ", ".join(
                  f"{TITLES[n]} {100 * (results[n][chosen]['cifar100'] - best[n]):+.1f}" for n in args.models) + "."]
    write_results(Path(args.out), "\n".join(lines), {"machine": machine(), "args": vars(args), "models": results})


if __name__ == "__main__":
    main()
