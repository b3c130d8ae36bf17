"""The runtime loads and runs an artifact without the compiler: no transformers, no TVM
compiler, no capture/passes/codegen modules in the process."""

import json
import subprocess
import sys


def test_loading_and_running_imports_no_compiler_module(compiled):
    art = compiled("deepseek_v3", "int8")
    code = f"""
import json, sys, torch, ktc
m = ktc.load({str(art)!r})
m(torch.tensor([[1, 2, 3]]))
m.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
print(json.dumps(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = set(json.loads(out.strip().splitlines()[-1]))
    forbidden = {"transformers", "tvm", "ktc.capture", "ktc.passes", "ktc.codegen", "ktc.compiler", "ktc.tiny"}
    assert not modules & forbidden, modules & forbidden
    assert "tvm_ffi" in modules and "ktc.runtime.cpu_experts" in modules
