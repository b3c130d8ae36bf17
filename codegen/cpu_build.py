"""Build subprocess for the CPU expert kernels: `python -m ktc.codegen.cpu_build request.json`.

Run by ktc.codegen.cpu_experts.build_cpu_kernels, never imported by the compiler process: it
imports TVM, builds every requested spec into one IRModule, compiles it with tvm.compile for
the request's JSON target, exports the shared library, writes the assembly (for the
instruction check when no objdump is around) and a result JSON. The config's
"prefill_variants" (vnni / amx targets) add, per quantized spec, the same kernel built with each
other int8/int4 prefill path as symbol "<name>__<path>", and its "tile_variants" ({name: KernelConfig
overrides of the micro-kernel shapes}) the same kernel with other tile shapes as "<name>__<variant>",
for the runtime to choose by tuning. The library also links HELPERS_C (the atomic counter the
int-dot prefill's work stealing claims items with: TIR has no CPU atomics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

# C helpers the kernels call (T.call_extern), compiled and linked into the kernel library
HELPERS_C = """\
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
int32_t ktc_fetch_add_i32(int32_t* p, int32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
#ifdef __cplusplus
}
#endif
"""


def _path_fits(path: str, variant: str) -> bool:
    """Whether a kernel variant can take the int8/int4 prefill path `path` (tir_experts.KernelConfig)."""
    if path.startswith("bf16"):
        return variant in ("amx", "amx-emu")
    return variant != "fma"


def main(argv: list[str]) -> int:
    req = json.loads(open(argv[1]).read())

    import tvm

    from ktc.codegen.cpu_experts import ExpertKernelSpec
    from ktc.codegen.tir_experts import KernelConfig, make_moe_prim_func

    config = dict(req["config"])
    extra = [p for p in config.pop("prefill_variants", []) if p != config.get("prefill", "int")]
    tile_variants = dict(config.pop("tile_variants", {}))
    cfg = KernelConfig(**config)
    funcs = {}
    symbols = {}
    variants: dict[str, dict[str, str]] = {}
    tiles: dict[str, dict[str, str]] = {}
    for d in req["specs"]:
        spec = ExpertKernelSpec.from_dict(d)
        sym = spec.name
        more = [p for p in extra if spec.quantized and _path_fits(p, cfg.variant)]
        paths = [cfg.prefill, *more]
        funcs[sym] = make_moe_prim_func(spec.hidden_size, spec.intermediate_size, spec.num_experts,
                                        spec.top_k, spec.format, spec.group_size, cfg, sym, paths)
        symbols[spec.name] = sym
        for path in more:      # the same kernel with another int8/int4 prefill path
            vsym = f"{sym}__{path}"
            funcs[vsym] = make_moe_prim_func(spec.hidden_size, spec.intermediate_size, spec.num_experts,
                                             spec.top_k, spec.format, spec.group_size,
                                             dataclasses.replace(cfg, prefill=path), vsym, paths)
            variants.setdefault(spec.name, {})[path] = vsym
        for vname, overrides in tile_variants.items():   # the same kernel with other micro-kernel shapes
            vsym = f"{sym}__{vname}"
            try:
                funcs[vsym] = make_moe_prim_func(spec.hidden_size, spec.intermediate_size, spec.num_experts,
                                                 spec.top_k, spec.format, spec.group_size,
                                                 dataclasses.replace(cfg, **overrides), vsym, paths)
            except ValueError:      # shapes this spec cannot take (tile_rows must divide H and I): not built
                continue
            tiles.setdefault(spec.name, {})[vname] = vsym
    target = tvm.target.Target(req["target"])
    ex = tvm.compile(tvm.IRModule(funcs), target=target)
    helpers = os.path.join(os.path.dirname(os.path.abspath(req["lib"])), "ktc_helpers.c")
    with open(helpers, "w") as f:
        f.write(HELPERS_C)
    try:
        ex.export_library(req["lib"], addons=[helpers])
    finally:
        os.remove(helpers)
    with open(req["asm"], "w") as f:
        f.write(ex.mod.inspect_source("s"))
    runtime_lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime.so")
    with open(req["result"], "w") as f:
        json.dump({"symbols": symbols, "variants": variants, "tiles": tiles, "needs_runtime": True,
                   "runtime_lib": runtime_lib}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
