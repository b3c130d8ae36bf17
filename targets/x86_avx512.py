"""x86-64 with AVX512 (F, BW, VL) and AVX512-VNNI: Skylake-SP/Cascade Lake and newer, Zen 4.

Routed-expert kernels: decode on the dequantize-and-FMA micro-kernels, int8/int4 prefill on
VNNI integer dot products (vpdpbusd), see codegen/tir_intdot.py.
"""

from ktc.targets import CpuTarget

TARGET = CpuTarget(
    name="x86-avx512",
    description="x86-64 AVX512 + VNNI",
    required_features=("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    tvm_target={"kind": "llvm", "mcpu": "cascadelake",
                "mattr": ["+avx2", "+fma", "+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni"]},
    expected_instructions=("zmm", "vfmadd"),
    quant_instructions=("vpdpbusd",),
)
