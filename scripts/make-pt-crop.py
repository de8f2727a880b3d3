#!/usr/bin/env python3
"""Write the reference's crop file format for a fixture crop: torch.save of a bare float32
tensor [1, 1, 100, 100, 100] of HU (what the published crop_nodule.py writes).

Needs: pip install torch safetensors numpy
Usage: make-pt-crop.py tests/fixtures/reference/expected.safetensors synthetic0 tests/fixtures/crops/synthetic0.pt
"""
import sys

import torch
from safetensors.numpy import load_file

expected, name, out = sys.argv[1:4]
crop = load_file(expected)[f"{name}.crop_hu"].astype("float32")
assert crop.shape == (100, 100, 100), crop.shape
torch.save(torch.from_numpy(crop).reshape(1, 1, 100, 100, 100), out)
