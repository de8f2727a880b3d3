#!/usr/bin/env python3
"""One-vs-rest AUROC of each class's zero-shot probability, per class (docs/finetune.md).

Usage: scripts/zero-shot-by-class.py SCORES MANIFEST [FEATURE]
SCORES is an `eval --out` scores.csv (columns zs_<feature>_<class index>); MANIFEST the
manifest it scored (pid, nodule_id and the semantic columns). FEATURE is a zero-shot key
with its manifest column and class spellings below (default nodule_margin). Needs numpy.
"""
import csv
import sys

import numpy as np

# key -> (manifest column, manifest spelling per zero-shot class index, as src/semantics.rs)
FEATURES = {
    "nodule_margin": ("nodule_margins", ["Smooth", "Lobulated", "Spiculated/Serrated"]),
    "nodule_shape": ("nodule_shape", ["Complex/Irregular", "Ovoid", "Polygonal", "Round"]),
}


def auroc(y, s):
    """Mann-Whitney AUROC with average ranks for ties."""
    y = np.asarray(y, bool)
    s = np.asarray(s, float)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = y.sum(), (~y).sum()
    return (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


scores, manifest = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "nodule_margin"
column, classes = FEATURES[key]
truth = {(r["pid"], r["nodule_id"]): r[column] for r in csv.DictReader(open(manifest))}
rows = list(csv.DictReader(open(scores)))
values = [truth[(r["patient_id"], r["nodule_id"])] for r in rows]
for k, name in enumerate(classes):
    y = [v == name for v in values]
    if 0 < sum(y) < len(y):
        p = [float(r[f"zs_{key}_{k}"]) for r in rows]
        print(f"{key} {name}: n {sum(y)}  one-vs-rest AUROC {auroc(y, p):.3f}")
