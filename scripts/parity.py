#!/usr/bin/env python3
"""Parity of `noduled score` output with the reference fixtures, Python standard library only
(the GPU machine's Python may lack numpy; this must run anywhere).

  parity.py pack FIXTURES OUTDIR
      write OUTDIR/{nodule}.planes.safetensors (tensor planes01 [9,224,224]) for every nodule
      of FIXTURES (tests/fixtures/reference) and OUTDIR/expected.json (per-fold prob,
      calibrated, MIL attention; ensemble raw/calibrated; fold-mean zero-shot descriptor
      probabilities), about 5 MB in all: what the GPU machine needs without the fixtures.
  parity.py compare EXPECTED.json NODULE SCORE.json [--tol-prob X]
      compare one nodule's score JSON (`noduled score --planes ...`) with EXPECTED.json;
      print one JSON line with the largest absolute errors and "pass" (every error <= X).
      Exit 0 on pass, 1 on fail.

The default tolerance is the fixtures' README's for a float32 implementation (1e-5 on
probabilities, calibrated scores, attention and zero-shot probabilities).
"""
import json
import struct
import sys

DTYPES = {"F32": ("f", 4), "F64": ("d", 8), "I64": ("q", 8)}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        code, size = DTYPES[meta["dtype"]]
        start, end = meta["data_offsets"]
        count = (end - start) // size
        out[key] = (meta["shape"], struct.unpack("<%d%s" % (count, code), data[start:end]))
    return out


def write_planes(values, path):
    header = {"planes01": {"dtype": "F32", "shape": [9, 224, 224],
                           "data_offsets": [0, 4 * len(values)]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(struct.pack("<%df" % len(values), *values))


def pack(fixtures, outdir):
    """Writes each nodule's planes file and the expected values the comparison needs."""
    exp = read_safetensors(fixtures + "/expected.safetensors")
    cases = json.load(open(fixtures + "/cases.json"))
    nodules = cases["nodules"]
    folds = sorted({int(k.split(".")[0][4:]) for k in exp if k.startswith("fold")})
    want = {}
    for idx, nodule in enumerate(nodules):
        shape, values = exp[nodule + ".planes01"]
        assert shape == [9, 224, 224], shape
        write_planes(values, "%s/%s.planes.safetensors" % (outdir, nodule))
        name = lambda k, s: "fold%d.%s.%s" % (k, nodule, s)
        descriptors = {}
        for feature, spec in cases["zero_shot"].items():
            c = len(spec["classes"])
            descriptors[feature] = {
                cls: sum(exp["fold%d.zeroshot.%s" % (k, feature)][1][idx * c + ci]
                         for k in folds) / len(folds)
                for ci, cls in enumerate(spec["classes"])}
        want[nodule] = {
            "folds": [{"prob": exp[name(k, "prob")][1][0],
                       "calibrated": exp[name(k, "calibrated")][1][0],
                       "attention": list(exp[name(k, "mil_attention")][1])} for k in folds],
            "raw": exp["ensemble.raw"][1][idx],
            "calibrated": exp["ensemble.calibrated"][1][idx],
            "descriptors": descriptors,
        }
    with open(outdir + "/expected.json", "w") as f:
        json.dump(want, f)
    print(" ".join(nodules))


def compare(expected_json, nodule, score_path, tol):
    want = json.load(open(expected_json))[nodule]
    doc = json.load(open(score_path))
    n = doc["nodules"][0]
    err = {"prob": 0.0, "calibrated": 0.0, "attention": 0.0, "ensemble": 0.0, "descriptors": 0.0}
    if len(n["folds"]) != len(want["folds"]):
        raise SystemExit("%s: %d folds, expected %d" % (score_path, len(n["folds"]), len(want["folds"])))
    for f, w in zip(n["folds"], want["folds"]):
        err["prob"] = max(err["prob"], abs(f["prob"] - w["prob"]))
        err["calibrated"] = max(err["calibrated"], abs(f["calibrated"] - w["calibrated"]))
        err["attention"] = max([err["attention"]] +
                               [abs(a - b) for a, b in zip(f["attention"], w["attention"])])
    err["ensemble"] = max(abs(n["score"]["raw"] - want["raw"]),
                          abs(n["score"]["calibrated"] - want["calibrated"]))
    for feature, classes in want["descriptors"].items():
        for cls, p in classes.items():
            err["descriptors"] = max(err["descriptors"], abs(n["descriptors"][feature][cls] - p))
    worst = max(err.values())
    ok = worst <= tol and all(v == v for v in err.values())
    print(json.dumps({"nodule": nodule, "model": doc["model"], "max_abs_error": err,
                      "worst": worst, "tolerance": tol, "pass": ok}))
    return ok


def main(argv):
    if len(argv) == 4 and argv[1] == "pack":
        pack(argv[2], argv[3])
        return 0
    if len(argv) >= 5 and argv[1] == "compare":
        tol = float(argv[argv.index("--tol-prob") + 1]) if "--tol-prob" in argv else 1e-5
        return 0 if compare(argv[2], argv[3], argv[4], tol) else 1
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
