#!/usr/bin/env python3
"""Makes tests/fixtures/eval: fixed inputs and the numbers scikit-learn 1.9 / betacal 1.1.0 /
numpy give for them. Run once (python3 -m venv v && v/bin/pip install numpy scikit-learn betacal);
the Rust tests read the files and never call Python.

    python3 scripts/make_eval_fixtures.py tests/fixtures/eval
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np
from betacal import BetaCalibration
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (average_precision_score, brier_score_loss, precision_recall_curve,
                             roc_auc_score, roc_curve)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(20261127)

# --- binary scores: 300 nodules of 110 patients, scores rounded to 2 decimals (many ties) ---
n = 300
patients = rng.integers(0, 110, n)
labels = (rng.random(n) < 0.3).astype(int)
raw = 1 / (1 + np.exp(-(rng.normal(0, 1.2, n) + 1.3 * labels - 0.6)))
scores = np.round(raw, 2)
with open(out / "scores.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["patient_id", "label", "score"])
    for p, y, s in zip(patients, labels, scores):
        w.writerow([f"P{p:03d}", int(y), f"{s:.2f}"])
# read back exactly what the file says
scores = np.array([float(f"{s:.2f}") for s in scores])


def operating_points(y, s, targets):
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    pts = []
    for t in targets:
        # thresholds are descending; skip the leading +inf point (predicts nothing positive)
        k = 1 + int(np.argmin(np.abs(tpr[1:] - t)))
        pred = s >= thr[k]
        tp = int(np.sum(pred & (y == 1)))
        fp = int(np.sum(pred & (y == 0)))
        pts.append({"target_recall": t, "threshold": float(thr[k]), "recall": float(tpr[k]),
                    "fpr": float(fpr[k]), "precision": tp / (tp + fp)})
    return pts


fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
prec, rec, pthr = precision_recall_curve(labels, scores)
prob_true, prob_pred = calibration_curve(labels, scores, n_bins=10, strategy="uniform")
bins = np.searchsorted(np.linspace(0, 1, 11)[1:-1], scores, side="left")  # as sklearn calibration_curve
counts = np.bincount(bins, minlength=10)

# a percentile bootstrap with numpy's generator: a statistical cross-check only (other RNG)
B = 10000
pid_rows = {}
for i, p in enumerate(patients):
    pid_rows.setdefault(p, []).append(i)
groups = [np.array(v) for v in pid_rows.values()]
brng = np.random.default_rng(7)
aucs, aps = [], []
for _ in range(B):
    pick = brng.integers(0, len(groups), len(groups))
    idx = np.concatenate([groups[g] for g in pick])
    yb, sb = labels[idx], scores[idx]
    if yb.min() == yb.max():
        continue
    aucs.append(roc_auc_score(yb, sb))
    aps.append(average_precision_score(yb, sb))

binary = {
    "n": n,
    "auroc": roc_auc_score(labels, scores),
    "average_precision": average_precision_score(labels, scores),
    "brier": brier_score_loss(labels, scores),
    "roc": {"fpr": fpr[1:].tolist(), "tpr": tpr[1:].tolist(), "thresholds": thr[1:].tolist()},
    "pr": {"precision": prec.tolist(), "recall": rec.tolist(), "thresholds": pthr.tolist()},
    "operating_points": operating_points(labels, scores, [0.6, 0.7, 0.8, 0.9]),
    "reliability": {"prob_true": prob_true.tolist(), "prob_pred": prob_pred.tolist(),
                    "counts": counts.tolist()},
    "bootstrap_patients_numpy": {
        "auroc": np.percentile(aucs, [2.5, 97.5]).tolist(),
        "average_precision": np.percentile(aps, [2.5, 97.5]).tolist(),
    },
}

# --- tiny hand-checkable case with ties across classes ---
tiny_y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
tiny_s = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.8, 0.3, 0.9])
tiny = {"labels": tiny_y.tolist(), "scores": tiny_s.tolist(),
        "auroc": roc_auc_score(tiny_y, tiny_s),
        "average_precision": average_precision_score(tiny_y, tiny_s),
        "brier": brier_score_loss(tiny_y, tiny_s)}

# --- multi-class zero-shot: 5 classes, softmax probabilities, weighted one-vs-rest ---
m = 120
truth = rng.choice(5, m, p=[0.4, 0.25, 0.15, 0.12, 0.08])
logits = rng.normal(0, 1, (m, 5))
logits[np.arange(m), truth] += 0.9
probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
probs = np.round(probs, 4)
probs[:, -1] = 1 - probs[:, :-1].sum(1)  # rows sum to 1 after rounding
multiclass = {"truth": truth.tolist(), "probs": probs.tolist(),
              "auroc_ovr_weighted": roc_auc_score(truth, probs, multi_class="ovr", average="weighted"),
              "per_class_auroc": [roc_auc_score(truth == c, probs[:, c]) for c in range(5)]}

# --- beta calibration (betacal 1.1.0, parameters="abm") on three validation sets ---
def betacal_case(s, y):
    bc = BetaCalibration(parameters="abm").fit(s, y)
    a, b, _ = bc.calibrator_.map_
    lr = bc.calibrator_.lr_
    grid = np.array([0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999])
    return {"scores": s.tolist(), "labels": y.tolist(), "a": float(a), "b": float(b),
            "c": float(lr.intercept_[0]), "grid": grid.tolist(), "predicted": bc.predict(grid).tolist(),
            "exact": exact_beta(s, y)}


def exact_beta(s, y):
    """betacal's rule with the regressions solved to convergence (betacal's lbfgs stops at
    tol=1e-4, about 1e-2 off the optimum on the coefficients)."""
    eps = np.finfo(np.float64).eps
    s = np.clip(s, eps, 1 - eps)
    x = np.stack([np.log(s), -np.log(1 - s)], 1)
    tight = dict(C=99999999999, tol=1e-12, max_iter=100000)
    lr = LogisticRegression(**tight).fit(x, y)
    a, b = lr.coef_[0]
    if a < 0:
        lr = LogisticRegression(**tight).fit(x[:, 1:], y)
        a, b = 0.0, lr.coef_[0][0]
    elif b < 0:
        lr = LogisticRegression(**tight).fit(x[:, :1], y)
        a, b = lr.coef_[0][0], 0.0
    return {"a": float(a), "b": float(b), "c": float(lr.intercept_[0])}


s1 = rng.beta(2, 3, 200)
y1 = (rng.random(200) < 1 / (1 + np.exp(-(2.5 * np.log(s1 / (1 - s1)) + 0.4)))).astype(int)
# a < 0 is refitted on -ln(1-s) only: labels high for scores near 0 and near 1
s2 = rng.uniform(0.001, 0.999, 200)
y2 = (rng.random(200) < np.where(s2 < 0.15, 0.8, 0.2 + 0.7 * s2)).astype(int)
# b < 0 is refitted on ln s only: labels low for scores near 0 and near 1
s3 = rng.uniform(0.001, 0.999, 200)
y3 = (rng.random(200) < np.where(s3 > 0.85, 0.15, 0.1 + 0.8 * s3)).astype(int)
beta = [betacal_case(s1, y1), betacal_case(s2, y2), betacal_case(s3, y3)]

# numpy's default (linear) percentile, for the bootstrap's percentile helper
pv = rng.normal(0, 1, 37)
percentile = {"values": pv.tolist(), "q": [0.0, 2.5, 50.0, 97.5, 100.0],
              "expected": np.percentile(pv, [0.0, 2.5, 50.0, 97.5, 100.0]).tolist()}

with open(out / "expected.json", "w") as f:
    json.dump({"generator": "scripts/make_eval_fixtures.py", "binary": binary, "tiny": tiny,
               "multiclass": multiclass, "beta_calibration": beta, "percentile": percentile}, f, indent=1)
print("a,b per beta case:", [(round(c["a"], 4), round(c["b"], 4), round(c["c"], 4)) for c in beta])
print("auroc", binary["auroc"], "ap", binary["average_precision"], "boot", binary["bootstrap_patients_numpy"])
