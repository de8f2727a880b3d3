#!/usr/bin/env python3
"""Linear-probe baselines for synthetic nodule crops (docs/finetune.md, "For scale").

Usage: scripts/probe-synth-features.py DIR [N] [attributes]
DIR is a `noduled synth --crops --label rule` folder (seed 11 and N 1200 in the docs). Needs
numpy. The first N cases are used: the first 5/6 to fit, the rest to test. The script fits
logistic regression on two feature sets: 7x7 means of the three orthogonal 50 mm planes
through the centre, and 12 global plane statistics. It fits each set against the rule
labels of both populations, which it recomputes from the semantic columns with the weights
of src/synth.rs (`Population::logit`). It prints the test AUROCs, the true mean diameter's
(the manifest's mean axial diameter), and the AUROC of parts of the rule's own logit
(semantic columns, no image): without its margin terms, and with only its diameter,
consistency and calcification terms.
With `attributes` it fits single attributes instead (mean diameter > 10 mm, ovoid shape,
spiculated margin): the probes beside the tiny tower in docs/finetune.md.
"""
import csv
import sys

import numpy as np

d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1200
rows = list(csv.DictReader(open(d + "/manifest.csv")))[:n]
f = lambda c: np.array(c, float)
dm = f([float(r["mean_diameter"]) for r in rows])
# The rule's diameter is the drawn sphere's: an ovoid nodule is that sphere stretched along
# x only in the axial plane, so it is the short axial diameter (to the manifest's 0.1 mm).
d_rule = f([float(r["short_diameter_(mm)"]) for r in rows])
sp = f([r["nodule_margins"].startswith("Spic") for r in rows])
lob = f([r["nodule_margins"].startswith("Lob") for r in rows])
ps = f([r["nodule_consistency"] == "Part-solid" for r in rows])
gg = f([r["nodule_consistency"] == "Pure ground glass" for r in rows])
calc = f([r["eccentric_calcification"] == "Present" for r in rows])
irr = f([r["nodule_shape"] == "Complex/Irregular" for r in rows])
cav = f([r["cavitation"] == "Present" for r in rows])
pl = f([r["pleural_attachment"] == "Present" for r in rows])
base = -4.2 + 0.11 * d_rule + 0.6 * irr + 0.8 * cav + 0.4 * pl - 2 * calc
# Each population's (margin terms, consistency terms) of the rule's logit.
terms = {
    "screening": (1.6 * sp + 0.8 * lob, 1.0 * ps + 0.3 * gg),
    "subsolid": (0.4 * sp + 0.4 * lob, 2.5 * ps + 2.0 * gg),
}
labels = {
    name: (base + margin + consistency > -1.5).astype(int)
    for name, (margin, consistency) in terms.items()
}
patch, glob = [], []
for r in rows:
    c = (np.clip(np.load(d + "/" + r["image_path"]), -1000, 500) + 1000) / 1500
    fp, fg = [], []
    for p in (c[50, 25:75, 25:75], c[25:75, 50, 25:75], c[25:75, 25:75, 50]):
        q = p[:49, :49]
        fp.extend(q.reshape(7, 7, 7, 7).mean(axis=(1, 3)).ravel())
        fp.extend((q > 0.3).reshape(7, 7, 7, 7).mean(axis=(1, 3)).ravel())
        fg.extend([p.mean(), (p > 0.3).mean(), (p > 0.6).mean(), p.std()])
    patch.append(fp)
    glob.append(fg)


def auc(s, y):
    """Mann-Whitney AUROC, ties counted one half (average ranks)."""
    values, inverse = np.unique(s, return_inverse=True)
    counts = np.bincount(inverse)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    pos = y.sum()
    return (rank[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos))


def probe(x, y):
    x = np.array(x)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    k = len(y) * 5 // 6
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(3000):
        g = 1 / (1 + np.exp(-(x[:k] @ w + b))) - y[:k]
        w -= 0.05 * (x[:k].T @ g / k + 1e-3 * w)
        b -= 0.05 * g.mean()
    return auc(x[k:] @ w, y[k:])


if len(sys.argv) > 3 and sys.argv[3] == "attributes":
    for name, y in {
        "mean diameter > 10 mm": (dm > 10).astype(int),
        "ovoid shape": f([r["nodule_shape"] == "Ovoid" for r in rows]).astype(int),
        "spiculated margin": sp.astype(int),
    }.items():
        print(
            f"{name}: positive {y.sum()}  patch-mean probe {probe(patch, y):.3f}  "
            f"global probe {probe(glob, y):.3f}"
        )
    sys.exit(0)

manifest = f([int(r["malignant"]) for r in rows])
for name, y in labels.items():
    print(f"{name}: recomputed labels equal the manifest's for {(y == manifest).mean():.3f}")
for name, y in labels.items():
    consistency = terms[name][1]
    no_margin = base + consistency
    size_density = -4.2 + 0.11 * d_rule - 2 * calc + consistency
    print(
        f"{name}: malignant {y.mean():.3f}  patch-mean probe {probe(patch, y):.3f}  "
        f"global probe {probe(glob, y):.3f}  true diameter {auc(dm, y):.3f}  "
        f"rule without margin {auc(no_margin, y):.3f}  "
        f"diameter+consistency+calcification {auc(size_density, y):.3f}"
    )
