"""x86-64 with AMX tiles (int8, bf16): Sapphire Rapids and newer Xeons.

For now the routed-expert kernels of this target are the AVX512 dequantize-and-FMA ones,
compiled for Sapphire Rapids (codegen/cpu_experts.py TARGET_CONFIGS): AMX tile kernels are a
separate piece of work. When they land, add the tile instructions (tdpbssd / tileloadd) to
expected_instructions.
"""

from ktc.targets import CpuTarget

TARGET = CpuTarget(
    name="x86-amx",
    description="x86-64 AMX-INT8/BF16 tiles + AVX512",
    required_features=("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                       "amx_tile", "amx_int8", "amx_bf16"),
    tvm_target={"kind": "llvm", "mcpu": "sapphirerapids",
                "mattr": ["+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni", "+amx-int8", "+amx-tile",
                          "+amx-bf16"]},
    expected_instructions=("zmm", "vfmadd"),
)
