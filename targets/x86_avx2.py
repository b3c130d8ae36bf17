"""x86-64 with AVX2 and FMA: every x86 server and desktop of the last decade; CI runs it."""

from ktc.targets import CpuTarget

TARGET = CpuTarget(
    name="x86-avx2",
    description="x86-64 AVX2 + FMA (fp32 dequantize-and-FMA kernels)",
    required_features=("avx2", "fma", "f16c"),
    tvm_target={"kind": "llvm", "mcpu": "haswell", "mattr": ["+avx2", "+fma", "+f16c"]},
    expected_instructions=("vfmadd", "ymm"),
)
