"""The default compile pipeline: the phases in order, as a plain list (like TVM's pipelines)."""

from __future__ import annotations

from ktc.passes.expert_split import expert_split
from ktc.passes.fusion import fusion
from ktc.passes.kernel_selection import kernel_selection
from ktc.passes.manager import Pass
from ktc.passes.placement import placement
from ktc.passes.quantization import quantization

DEFAULT_PIPELINE: list[Pass] = [placement, expert_split, quantization, fusion, kernel_selection]
