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


def _fix_interpreter_fp8_rounding() -> None:
    """Triton's interpreter rounds float32 -> float8_e4m3fn by adding the cut-off bit to the 3-bit
    mantissa without carrying into the exponent (125.5 becomes 64, not 128) and ties away from zero;
    the GPU's conversion (cvt.rn.satfinite) rounds to nearest even. The interpreter is made to convert as
    torch does (round to nearest even), so that the w8a8 kernels' on-the-fly quantization can be checked
    exactly here; other conversions keep the interpreter's own code."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            t = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)).to(torch.float8_e4m3fn)
            return t.view(torch.uint8).numpy().reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_fp8_rounding()
