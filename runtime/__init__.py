"""The ktc runtime: loads an artifact and runs it.

Depends on torch, numpy, safetensors and apache-tvm-ffi (plus tokenizers for text), never on
transformers, the TVM compiler, ktc.capture, ktc.passes or ktc.codegen.
"""
