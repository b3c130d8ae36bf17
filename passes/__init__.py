"""Compiler passes: each a pure function Graph -> Graph, one per file, run by passes.manager.

Passes never touch files; codegen never decides placement. The default pipeline is in
passes/pipeline.py.
"""
