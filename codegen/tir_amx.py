"""AMX tile instructions as TIR macros (LLVM intrinsics: TVM 0.27 has no AMX intrinsic).

Shared by the two AMX prefill paths, codegen/tir_intdot.py (tdpbsud on int8) and
codegen/tir_amx_bf16.py (tdpbf16ps on bf16). Each keeps its own emulated ("amx-emu") zero, load,
product and store, whose semantics differ by data type; config and release are emu_config /
emu_release here. The macros take the emulation's register buffers
(treg, creg) too, unused here, so that both versions are called the same way.
"""

from __future__ import annotations

from tvm.script import tirx as T


@T.macro
def emu_config(cfg):
    """The emulations' tile configuration: nothing to configure (cfg is written so it is used)."""
    cfg[0] = T.uint8(1)


@T.macro
def emu_release():
    T.evaluate(0)


def tile_ops(product: str, shapes: list[tuple[int, int]]):
    """(tl_config, tl_release, tl_zero, tl_load, tl_dp, tl_store) of real AMX tiles.

    product: the tile product intrinsic ("llvm.x86.tdpbsud", "llvm.x86.tdpbf16ps");
    shapes: (rows, bytes per row) of tiles 0..7, written into the 64-byte tile configuration."""
    assert len(shapes) == 8
    (r0, b0), (r1, b1), (r2, b2), (r3, b3), (r4, b4), (r5, b5), (r6, b6), (r7, b7) = shapes

    @T.macro
    def tl_config(cfg):
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)                       # palette 1; bytes per row at 16 + 2t, rows at 48 + t
        cfg[16] = T.uint8(b0)
        cfg[48] = T.uint8(r0)
        cfg[18] = T.uint8(b1)
        cfg[49] = T.uint8(r1)
        cfg[20] = T.uint8(b2)
        cfg[50] = T.uint8(r2)
        cfg[22] = T.uint8(b3)
        cfg[51] = T.uint8(r3)
        cfg[24] = T.uint8(b4)
        cfg[52] = T.uint8(r4)
        cfg[26] = T.uint8(b5)
        cfg[53] = T.uint8(r5)
        cfg[28] = T.uint8(b6)
        cfg[54] = T.uint8(r6)
        cfg[30] = T.uint8(b7)
        cfg[55] = T.uint8(r7)
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))

    @T.macro
    def tl_release():
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    @T.macro
    def tl_zero(c, creg):
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(c)))

    @T.macro
    def tl_load(t, buf, off, stride, treg):
        """Tile t <- its rows from buf at element `off`, rows `stride` bytes apart."""
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(t), T.address_of(buf[off]),
                                      T.int64(stride)))

    @T.macro
    def tl_dp(c, a, bt, treg, creg):
        T.evaluate(T.call_llvm_intrin("void", product, T.int8(c), T.int8(a), T.int8(bt)))

    @T.macro
    def tl_store(c, cbuf, creg):
        """Tile c -> cbuf[c * 256:] (16 rows of 64 bytes)."""
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(c), T.address_of(cbuf[c * 256]),
                                      T.int64(64)))

    return tl_config, tl_release, tl_zero, tl_load, tl_dp, tl_store
