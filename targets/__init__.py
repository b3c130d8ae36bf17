"""Hardware targets: what each needs from a host, its TVM target, and host detection.

One module per target (x86_avx2.py, x86_avx512.py, x86_amx.py), found by name; this module
is the registry. Dependency-free (reads /proc/cpuinfo), so the runtime uses it to refuse an
artifact whose kernels this host cannot run before anything runs.
"""

from __future__ import annotations

import functools
import importlib
import platform
from dataclasses import dataclass, field
from typing import Any

# Preference order for `--target cpu`: the best one the host can run wins.
CPU_TARGET_NAMES = ("x86-amx", "x86-avx512", "x86-avx2")


@dataclass(frozen=True)
class CpuTarget:
    """A CPU code generation target."""

    name: str
    description: str
    required_features: tuple[str, ...]          # /proc/cpuinfo flag names
    tvm_target: dict[str, Any] = field(default_factory=dict)   # JSON dict for tvm.target.Target
    expected_instructions: tuple[str, ...] = ()  # mnemonics the built object must contain
    quant_instructions: tuple[str, ...] = ()     # ... and, when it holds int8/int4 kernels, these
    kind: str = "cpu"

    def missing_features(self, host: frozenset[str] | None = None) -> list[str]:
        have = host_cpu_features() if host is None else host
        return [f for f in self.required_features if f not in have]

    def runs_here(self) -> bool:
        return platform.machine() in ("x86_64", "AMD64") and not self.missing_features()


def _module_name(name: str) -> str:
    return "ktc.targets." + name.replace("-", "_")


def get(name: str) -> CpuTarget:
    """The target called `name` (e.g. "x86-avx2"); KeyError if there is none."""
    if name not in CPU_TARGET_NAMES:
        raise KeyError(name)
    return importlib.import_module(_module_name(name)).TARGET


def all_targets() -> list[CpuTarget]:
    return [get(n) for n in CPU_TARGET_NAMES]


@functools.lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str]:
    """CPU feature flags of this host, as /proc/cpuinfo names them (empty if unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def best_host_cpu_target() -> CpuTarget | None:
    """The fastest CPU target this host can run, or None."""
    for t in all_targets():
        if t.runs_here():
            return t
    return None


def resolve_cpu_target(name: str) -> CpuTarget:
    """Map a --target / --cpu-target value ("cpu", "auto", or a target name) to a target.

    Raises KeyError with the known names when `name` is unknown, LookupError when the host
    has none of them (for "cpu"/"auto").
    """
    if name in ("cpu", "auto"):
        t = best_host_cpu_target()
        if t is None:
            raise LookupError("this host runs none of the CPU targets " + ", ".join(CPU_TARGET_NAMES))
        return t
    return get(name)
