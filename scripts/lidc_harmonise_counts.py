#!/usr/bin/env python3
"""Independent count of the LIDC -> NLST harmonisation (standard library only), whose output
is recorded in tests/it/eval.rs (lidc_harmonisation_counts_match_python).

    python3 scripts/lidc_harmonise_counts.py tests/fixtures/lidc/lidc_annotations_clustered.csv

Rules: group annotations by (scan_id, nodule_idx); median over readers for the ordinal ratings
(mean of the two middle values for an even count); mode for internalStructure and
calcification, ties to the smallest value. internalStructure 4 -> cyst-like spaces present;
calcification 4 -> eccentric calcification present; sphericity > 3 -> Round else Ovoid;
margin >= 3 -> Well marginated else Poorly marginated; lobulation >= 3 -> nodule margin
Lobulated (else missing); spiculation >= 3 -> additional margin Spiculated (else missing);
texture < 2 -> Pure ground glass, > 4 -> Solid, else Part-solid.
"""
import csv
import statistics
import sys
from collections import Counter, defaultdict

groups = defaultdict(list)
with open(sys.argv[1], newline="") as f:
    for row in csv.DictReader(f):
        groups[(int(row["scan_id"]), int(row["nodule_idx"]))].append(row)


def med(rows, key):
    return statistics.median(float(r[key]) for r in rows)


def mode(rows, key):
    c = Counter(int(r[key]) for r in rows)
    top = max(c.values())
    return min(v for v, k in c.items() if k == top)


counts = Counter()
for rows in groups.values():
    counts["lesions"] += 1
    t = med(rows, "texture")
    counts["Pure ground glass" if t < 2 else "Solid" if t > 4 else "Part-solid"] += 1
    counts["Round" if med(rows, "sphericity") > 3 else "Ovoid"] += 1
    counts["Well marginated" if med(rows, "margin") >= 3 else "Poorly marginated"] += 1
    counts["Lobulated"] += med(rows, "lobulation") >= 3
    counts["Spiculated"] += med(rows, "spiculation") >= 3
    counts["cyst_like_spaces present"] += mode(rows, "internalStructure") == 4
    counts["eccentric_calcification present"] += mode(rows, "calcification") == 4
    counts["readers>=3"] += len(rows) >= 3
for k, v in sorted(counts.items()):
    print(f"{k}: {v}")

# Semantic sampler weights (the reference's weighted="semantic"), lesions sorted by
# (scan_id, nodule_idx): per column, missing -> most frequent class (ties: first met),
# weight += ln(1 / count of the lesion's class); then (w - min + 1e-6) / (max - min).
# Columns LIDC does not rate are entirely missing and skipped.
import math

lesions = []
for key in sorted(groups):
    rows = groups[key]
    t = med(rows, "texture")
    lesions.append({
        "consistency": "Pure ground glass" if t < 2 else "Solid" if t > 4 else "Part-solid",
        "shape": "Round" if med(rows, "sphericity") > 3 else "Ovoid",
        "conspicuity": "Well" if med(rows, "margin") >= 3 else "Poorly",
        "margin": "Lobulated" if med(rows, "lobulation") >= 3 else None,
        "additional": "Spiculated" if med(rows, "spiculation") >= 3 else None,
        "cyst": "Present" if mode(rows, "internalStructure") == 4 else "Absent",
        "eccentric": "Present" if mode(rows, "calcification") == 4 else "Absent",
    })
weights = [0.0] * len(lesions)
for col in lesions[0]:
    values = [l[col] for l in lesions]
    seen = {}
    for v in values:
        if v is not None:
            seen[v] = seen.get(v, 0) + 1
    if not seen:
        continue
    top = max(seen.values())
    fill = next(v for v, n in seen.items() if n == top)
    values = [fill if v is None else v for v in values]
    count = Counter(values)
    for i, v in enumerate(values):
        weights[i] += math.log(1.0 / count[v])
lo, hi = min(weights), max(weights)
normalised = [(w - lo + 1e-6) / (hi - lo) for w in weights]
print(f"weights: sum {sum(normalised)!r}, first {normalised[:3]!r}, "
      f"argmax {normalised.index(max(normalised))}, zeros {sum(1 for w in normalised if w < 1e-5)}")
