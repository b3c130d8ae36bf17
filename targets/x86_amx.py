"""x86-64 with AMX tiles (int8, bf16): Sapphire Rapids and newer Xeons.

Routed-expert kernels: decode on the AVX512 dequantize-and-FMA micro-kernels (memory bound),
int8/int4 prefill on AMX-INT8 tiles (tdpbsud: int8 weights x u8 activations quantized on the
fly), see codegen/tir_intdot.py; the library also holds each int8/int4 kernel with the AMX-BF16
prefill path (tdpbf16ps on weights dequantized to bf16, codegen/tir_amx_bf16.py), which
`ktc tune` chooses per batch bucket where it is faster on the host. The runtime asks Linux for the tile state
(arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) before the first call.
"""

from ktc.targets import CpuTarget

TARGET = CpuTarget(
    name="x86-amx",
    description="x86-64 AMX-INT8/BF16 tiles + AVX512",
    required_features=("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi",
                       "amx_tile", "amx_int8", "amx_bf16"),
    tvm_target={"kind": "llvm", "mcpu": "sapphirerapids",
                "mattr": ["+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni", "+avx512vbmi", "+amx-int8", "+amx-tile",
                          "+amx-bf16"]},
    expected_instructions=("zmm", "vfmadd"),
    quant_instructions=("tdpbsud", "ldtilecfg", "tileloadd", "tilestored", "tilerelease"),
)
