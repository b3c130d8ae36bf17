"""Triton kernels run under TRITON_INTERPRET=1 (on CPU tensors) where there is no CUDA GPU.

The variable must be set before triton is first imported, hence here, at collection time.
On a machine with a GPU the same tests run the kernels for real on it.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
