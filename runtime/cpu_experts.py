"""Runs the TVM-built CPU routed-expert kernels of an artifact (see ktc.codegen.cpu_experts).

Imports only torch, numpy, tvm_ffi, ctypes, the standard library, ktc.targets and ktc.errors:
never the TVM compiler.

    kernels = CpuExpertKernels.load(artifact / "kernels/cpu", manifest_entry)
    y = kernels.moe_experts(name, x, topk_weights, topk_ids, packed_weights)

Before anything is loaded, `load` checks that this CPU has every feature the kernels were
built for and refuses with HostError otherwise: a kernel built for a richer ISA loads fine
and then dies with SIGILL when called. Kernels with parallel loops call TVM's thread pool,
which lives in libtvm_runtime.so; the artifact ships it ("runtime_libs") and it is loaded
with RTLD_GLOBAL before the kernel library (the copy already in the process, if any, is
reused). Threads: KTC_NUM_THREADS, else TVM_NUM_THREADS, else every core this process may
run on (TVM's own default would be half of them); read when the pool first starts. Kernels
built for AMX need the tile state, which Linux hands out per process on request
(arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)): `load` asks before anything runs.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch
import tvm_ffi
from torch import Tensor

from ktc.errors import ArtifactError, HostError, InputError
from ktc.targets import best_host_cpu_target, host_cpu_features

SUPPORTED_ABI = 2
MAX_INDEX = 2**31 - 1   # the kernels index their scratch with 32-bit ints
_runtime_libs: dict[str, ctypes.CDLL] = {}
_lib_lock = threading.Lock()
_SYS_ARCH_PRCTL = 158          # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_amx_granted = False
_DTYPES = {"float32": torch.float32, "int32": torch.int32, "uint8": torch.uint8}


def request_amx_permission() -> None:
    """Ask Linux for the AMX tile data state for this process (once); HostError if refused.
    Without it the first tile instruction kills the process (SIGILL)."""
    global _amx_granted
    if _amx_granted:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                      ctypes.c_ulong(_XFEATURE_XTILEDATA))
    if rc != 0:
        err = ctypes.get_errno()
        raise HostError(f"Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: {os.strerror(err)}); "
                        f"recompile with --target x86-avx512")
    _amx_granted = True


def num_threads() -> int:
    """The thread count the CPU kernels use (see the module docstring)."""
    for var in ("KTC_NUM_THREADS", "TVM_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v:
            try:
                n = int(v)
            except ValueError:
                raise InputError(f"{var}={v!r} is not a whole number of threads") from None
            if n < 1:
                raise InputError(f"{var} must be at least 1, got {n}")
            return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _configure_threads() -> None:
    # TVM's pool is per calling thread and reads TVM_NUM_THREADS when it starts (first
    # parallel call in that thread). runtime.config_threadpool is not used: it pins the
    # calling thread to one core.
    os.environ["TVM_NUM_THREADS"] = str(num_threads())


def _loaded_path(basename: str) -> str | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if path.endswith("/" + basename):
                    return path
    except OSError:
        pass
    return None


def _load_runtime_lib(path: Path) -> None:
    """dlopen a runtime library RTLD_GLOBAL, reusing a copy of the same name already mapped
    (two libtvm_runtime.so in one process would register their globals twice)."""
    with _lib_lock:
        if path.name in _runtime_libs:
            return
        existing = _loaded_path(path.name)
        target = existing if existing else str(path)
        try:
            _runtime_libs[path.name] = ctypes.CDLL(target, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise ArtifactError(f"cannot load the CPU kernel runtime {path}: {e}") from None


def check_host(entry: dict[str, Any]) -> None:
    """HostError (one line) unless this host has every CPU feature `entry` needs."""
    required = list(entry.get("required_features", []))
    if platform.machine() not in ("x86_64", "AMD64"):
        missing = required or ["x86-64"]
    else:
        have = host_cpu_features()
        missing = [f for f in required if f not in have]
    if missing:
        best = best_host_cpu_target()
        if best is None:
            hint = "this host runs none of ktc's CPU targets"
        elif best.name == "x86-avx2":
            hint = "recompile with --target x86-avx2"
        else:
            hint = f"recompile with --target {best.name} (or --target x86-avx2)"
        raise HostError(f"this CPU lacks {', '.join(missing)}, needed by the {entry.get('target', '?')} "
                        f"CPU expert kernels; {hint}")


class BoundCall:
    """One kernel call with its arguments fixed (CpuExpertKernels.bind; moe_experts makes one per
    call): the kernel's argument errors become one-line InputErrors."""

    __slots__ = ("fn", "args", "kernel_name", "tuning")

    def __init__(self, fn: Any, args: tuple, kernel_name: str, tuning: int):
        self.fn, self.args, self.kernel_name, self.tuning = fn, args, kernel_name, tuning

    def __call__(self) -> None:
        try:
            self.fn(*self.args)
        except (TypeError, ValueError) as e:
            raise InputError(f"{self.kernel_name}: {str(e).splitlines()[0]}") from None


class _Scratch(threading.local):
    def __init__(self) -> None:
        # per scratch layout: (capacity in tokens, its buffers, the views handed out per T).
        # The views are kept because slicing five tensors costs ~10 us, as much as a whole
        # single-token kernel call with few experts (decode calls come with one T, again and again)
        self.bufs: dict[tuple, tuple[int, list[Tensor], dict[int, list[Tensor]]]] = {}


class CpuExpertKernels:
    """The CPU expert kernels of one target, loaded from an artifact's kernel directory."""

    def __init__(self, module: Any, entry: dict[str, Any], kernel_dir: Path):
        self._module = module
        self.entry = entry
        self.kernel_dir = kernel_dir
        self._kernels: dict[str, dict[str, Any]] = {}
        for name, k in entry["kernels"].items():
            spec = k["spec"]
            # the kernel as built, and the same kernel with other int8/int4 prefill paths
            # ("moe_experts@<path>", x86-amx: "bf16"), chosen per batch bucket by `ktc tune`
            paths = {k.get("prefill", "int"): module[k["functions"]["moe_experts"]]}
            for key, sym in k["functions"].items():
                if key.startswith("moe_experts@"):
                    paths[key.split("@", 1)[1]] = module[sym]
            for fn in paths.values():
                try:
                    fn.release_gil = True   # other Python threads (GPU work) run meanwhile
                except AttributeError:
                    pass
            fn = paths[k.get("prefill", "int")]
            self._kernels[name] = {
                "fn": fn, "paths": paths, "tiles": [t for t in k.get("tile_variants", []) if t in paths],
                "prefill_from_pairs": int(k.get("prefill_from_pairs", 0)),
                "H": int(spec["hidden_size"]), "I": int(spec["intermediate_size"]),
                "E": int(spec["num_experts"]), "K": int(spec["top_k"]), "weights": list(k["weights"]),
                "scratch": [(d["name"], _DTYPES[d["dtype"]], int(d["fixed"]), int(d["per_token"]))
                            for d in k["scratch"]],
            }
        self._scratch = _Scratch()

    @classmethod
    def load(cls, kernel_dir: Path, entry: dict[str, Any]) -> CpuExpertKernels:
        kernel_dir = Path(kernel_dir)
        abi = entry.get("abi", SUPPORTED_ABI)
        if abi != SUPPORTED_ABI:
            raise ArtifactError(f"CPU kernels use ABI {abi}, this runtime knows {SUPPORTED_ABI}; "
                                f"recompile the model with this ktc")
        check_host(entry)   # before anything is loaded: never run code this CPU cannot execute
        if "amx_tile" in entry.get("required_features", []):
            request_amx_permission()
        lib = kernel_dir / entry["lib"]
        if not lib.is_file():
            raise ArtifactError(f"CPU kernel library {lib} is missing")
        _configure_threads()
        for name in entry.get("runtime_libs", []):
            _load_runtime_lib(kernel_dir / name)
        try:
            module = tvm_ffi.load_module(str(lib))
        except Exception as e:  # noqa: BLE001 - a damaged library is an artifact problem
            raise ArtifactError(f"cannot load CPU kernels {lib}: {str(e).splitlines()[0] if str(e) else e}") from None
        return cls(module, entry, kernel_dir)

    @property
    def kernel_names(self) -> list[str]:
        return list(self._kernels)

    def set_tuned_threads(self, kernel_name: str, by_bucket: dict[int, int] | None) -> None:
        """Thread counts (tasks the kernel's parallel phases split into) for `kernel_name` by batch
        bucket (runtime.tuning.BATCH_BUCKETS), from `ktc tune` records; None: num_threads() again."""
        tuned = self.__dict__.setdefault("_tuned_threads", {})
        self._tuning = self.tuning + 1
        if by_bucket:
            tuned[kernel_name] = {int(b): max(1, int(n)) for b, n in by_bucket.items()}
        else:
            tuned.pop(kernel_name, None)

    def prefill_paths(self, kernel_name: str) -> list[str]:
        """The int8/int4 prefill paths `kernel_name` was built with, its default first."""
        k = self._kernels[kernel_name]
        return [p for p in k["paths"] if p not in k["tiles"]]

    def tile_variants(self, kernel_name: str) -> list[str]:
        """The other micro-kernel shapes `kernel_name` was built with (codegen TARGET_CONFIGS
        "tile_variants"): functions `ktc tune` can choose at any batch bucket, like the prefill paths."""
        return list(self._kernels[kernel_name]["tiles"])

    def prefill_from_tokens(self, kernel_name: str) -> int:
        """The batch size from which calls can take the prefill path (0: unknown)."""
        k = self._kernels[kernel_name]
        return -(-k["prefill_from_pairs"] // k["K"]) if k["prefill_from_pairs"] else 0

    def set_tuned_prefill(self, kernel_name: str, by_bucket: dict[int, str] | None) -> None:
        """The function of `kernel_name` by batch bucket, from `ktc tune` records: a prefill path or a
        tile variant (names this build lacks are ignored); None: the default again."""
        tuned = self.__dict__.setdefault("_tuned_prefill", {})
        self._tuning = self.tuning + 1
        paths = self._kernels[kernel_name]["paths"] if kernel_name in self._kernels else {}
        table = {int(b): p for b, p in (by_bucket or {}).items() if p in paths}
        if table:
            tuned[kernel_name] = table
        else:
            tuned.pop(kernel_name, None)

    def _scratch_for(self, k: dict[str, Any], T: int) -> list[Tensor]:
        key = tuple(k["scratch"])
        cur = self._scratch.bufs.get(key)
        if cur is None or cur[0] < T:
            cap = max(T, 2 * cur[0] if cur else 1)
            cur = (cap, [torch.empty(fixed + per * cap, dtype=dt) for _, dt, fixed, per in k["scratch"]], {})
            self._scratch.bufs[key] = cur
        views = cur[2].get(T)
        if views is None:
            if len(cur[2]) >= 8:    # prefill sizes vary: keep a few
                cur[2].clear()
            views = cur[2][T] = [buf[: fixed + per * T]
                                 for buf, (_, _, fixed, per) in zip(cur[1], k["scratch"], strict=True)]
        return views

    def _checked(self, kernel_name: str, x: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                 out: Tensor | None) -> tuple[dict[str, Any], Tensor, Tensor, Tensor, Tensor]:
        """The kernel's entry and the call's tensors in the kernel's dtypes, or InputError."""
        k = self._kernels.get(kernel_name)
        if k is None:
            raise InputError(f"no CPU expert kernel {kernel_name!r}; this artifact has "
                             f"{', '.join(self._kernels) or 'none'}")
        H, K = k["H"], k["K"]
        if x.dim() != 2 or x.shape[1] != H:
            raise InputError(f"{kernel_name}: x must be [T, {H}], got {list(x.shape)}")
        T = x.shape[0]
        if tuple(topk_weights.shape) != (T, K) or tuple(topk_ids.shape) != (T, K):
            raise InputError(f"{kernel_name}: topk_weights and topk_ids must be [{T}, {K}], got "
                             f"{list(topk_weights.shape)} and {list(topk_ids.shape)}")
        if x.device.type != "cpu":
            raise InputError(f"{kernel_name}: CPU expert kernels take CPU tensors, got {x.device}")
        x = x.to(torch.float32).contiguous()
        tw = topk_weights.to(torch.float32).contiguous()
        ids = topk_ids.to(torch.int32).contiguous()
        if out is not None:
            if tuple(out.shape) != (T, H) or out.dtype != torch.float32 or not out.is_contiguous():
                raise InputError(f"{kernel_name}: out must be a contiguous float32 [{T}, {H}] tensor")
            y = out
        else:
            y = torch.empty(T, H, dtype=torch.float32)
        return k, x, tw, ids, y

    @staticmethod
    def _weights(kernel_name: str, k: dict[str, Any], packed: dict[str, Tensor]) -> list[Tensor]:
        weights = []
        for n in k["weights"]:
            t = packed.get(n)
            if t is None and n.endswith(".w"):   # dense weights may come under the bare role name
                t = packed.get(n[:-2])
            if t is None:
                raise InputError(f"{kernel_name}: packed weights lack part {n!r}")
            weights.append(t)
        return weights

    @staticmethod
    def _max_tokens(k: dict[str, Any]) -> int:
        """The most tokens one kernel call takes: it indexes its [T*K, H] scratch with 32-bit ints."""
        per_token = max(per for _, _, _, per in k["scratch"])
        return max(1, min(MAX_INDEX // (k["K"] * max(k["H"], k["I"])),
                          (MAX_INDEX - max(f for _, _, f, _ in k["scratch"])) // max(1, per_token)))

    def _function(self, kernel_name: str, k: dict[str, Any], T: int) -> tuple[Any, int]:
        """The function and thread count a call of T tokens runs with: `ktc tune` records of T's
        batch bucket where there are some, else the default path on num_threads()."""
        nthr = num_threads()
        fn = k["fn"]
        tuned = self.__dict__.get("_tuned_threads", {}).get(kernel_name)
        paths = self.__dict__.get("_tuned_prefill", {}).get(kernel_name)
        if tuned or paths:
            from ktc.runtime.tuning import batch_bucket

            b = batch_bucket(T)
            nthr = tuned.get(b, nthr) if tuned else nthr
            fn = k["paths"][paths.get(b, next(iter(k["paths"])))] if paths else fn
        return fn, nthr

    def moe_experts(self, kernel_name: str, x: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                    packed: dict[str, Tensor], out: Tensor | None = None) -> Tensor:
        """y[t] = sum_k w[t,k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = ids[t,k].

        x [T, H] float32, topk_weights [T, K] float32, topk_ids [T, K] int32 (ids outside
        [0, E) are skipped) -> y [T, H] float32 (written into `out` when given: a contiguous
        float32 [T, H] CPU tensor, e.g. pinned memory the GPU copies from). All expert math runs
        in the TVM kernel."""
        k, x, tw, ids, y = self._checked(kernel_name, x, topk_weights, topk_ids, out)
        T = x.shape[0]
        if T == 0:
            return y
        weights = self._weights(kernel_name, k, packed)
        step = self._max_tokens(k)     # huge batches are split
        fn, nthr = self._function(kernel_name, k, T)
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            scratch = self._scratch_for(k, t1 - t0)
            # one piece (every decode call): the tensors themselves, no views to make
            part = (x, tw, ids, y) if t1 - t0 == T else (x[t0:t1], tw[t0:t1], ids[t0:t1], y[t0:t1])
            BoundCall(fn, (*part[:3], *weights, part[3], *scratch, nthr), kernel_name, self.tuning)()
        return y

    def bind(self, kernel_name: str, x: Tensor, topk_weights: Tensor, topk_ids: Tensor,
             packed: dict[str, Tensor], out: Tensor) -> BoundCall:
        """moe_experts on these very tensors, checked once: calling the result runs the kernel on
        whatever they hold then, writing `out`. For a caller that computes into the same buffers
        again and again (a decode step's pinned buffers, once per layer and token): the argument
        handling of moe_experts costs ~20-45 us a call on the GPU machine's host, as much as a
        tenth of a single-token kernel, and a bound call only makes the FFI call. The tensors must
        already be contiguous in the kernel's dtypes (nothing is copied: the kernel must see the
        caller's buffers). A bound call belongs to the thread that bound it (its scratch is per
        thread) and to the tuning records in force then (`tuning` tells when they changed)."""
        k, x2, tw2, ids2, y = self._checked(kernel_name, x, topk_weights, topk_ids, out)
        if x2.data_ptr() != x.data_ptr() or tw2.data_ptr() != topk_weights.data_ptr() \
                or ids2.data_ptr() != topk_ids.data_ptr():
            raise InputError(f"{kernel_name}: a bound call needs contiguous float32 x and weights and int32 ids")
        T, most = x.shape[0], self._max_tokens(k)
        if not 1 <= T <= most:
            raise InputError(f"{kernel_name}: a bound call takes 1 to {most} tokens, got {T}")
        fn, nthr = self._function(kernel_name, k, T)
        args = [x, topk_weights, topk_ids, *self._weights(kernel_name, k, packed), y, *self._scratch_for(k, T)]
        try:   # tvm_ffi tensors made once: each call then skips the conversion from torch
            args = [tvm_ffi.from_dlpack(t) for t in args]
        except Exception:  # noqa: BLE001 - torch tensors work too, a little slower
            pass
        return BoundCall(fn, (*args, nthr), kernel_name, self.tuning)

    @property
    def tuning(self) -> int:
        """Changes whenever tuning records change which function or thread count a call takes."""
        return self.__dict__.get("_tuning", 0)
