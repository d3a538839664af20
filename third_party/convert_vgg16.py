#!/usr/bin/env python
"""Converts torchvision's VGG16 ImageNet weights to the .npz scr-jax reads.

  python third_party/convert_vgg16.py vgg16-397923af.pth vgg16_relu3_3.npz

Needs torch (CPU build is enough) only for reading the .pth file. Keeps the
seven convs up to relu3_3, as HWIO kernels and biases.
"""
import sys

import numpy as np

# torchvision's vgg16.features indices of the convs up to relu3_3
TORCH_IDS = {"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7,
             "conv3_1": 10, "conv3_2": 12, "conv3_3": 14}


def main(src, dst):
  import torch
  sd = torch.load(src, map_location="cpu")
  out = {}
  for name, i in TORCH_IDS.items():
    w = sd[f"features.{i}.weight"].numpy()  # O I H W
    out[name + "/kernel"] = np.transpose(w, (2, 3, 1, 0)).astype(np.float32)
    out[name + "/bias"] = sd[f"features.{i}.bias"].numpy().astype(np.float32)
  np.savez(dst, **out)
  print(f"wrote {dst}: {', '.join(TORCH_IDS)}")


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(sys.argv[1], sys.argv[2])
