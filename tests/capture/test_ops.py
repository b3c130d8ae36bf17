"""Capture ops (fake-only), the exported program (clean, dynamic) and importer errors."""

from __future__ import annotations

import pytest
import torch

from ktc.capture.ops import OPS, decode_spec


def test_fake_shapes_on_meta():
    x = torch.empty(2, 3, 64, device="meta")
    assert OPS["rms_norm"](x, torch.empty(64, device="meta"), 1e-6).shape == (2, 3, 64)
    cos, sin = OPS["rope"](torch.zeros(2, 3, dtype=torch.long, device="meta"), torch.empty(8, device="meta"), 1.0)
    assert cos.shape == sin.shape == (2, 3, 16) and cos.dtype == torch.float32
    w = [torch.empty(64, 64, device="meta")]
    assert OPS["attention"](x, cos, sin, w, "{}").shape == (2, 3, 64)
    assert OPS["moe"](x, w, "{}").shape == (2, 3, 64)
    assert OPS["mlp"](x, w, "{}").shape == (2, 3, 64)


def test_no_eager_kernel():
    with pytest.raises(NotImplementedError, match="capture op"):
        OPS["rms_norm"](torch.zeros(2, 4), torch.ones(4), 1e-6)


def test_exported_program_is_clean_and_dynamic(tiny_models):
    import transformers as tf

    from ktc.capture import qwen_moe
    from ktc.capture.export import build_meta_model, export_model, swap_modules

    cfg = tf.AutoConfig.from_pretrained(tiny_models["qwen2_moe"])
    model = build_meta_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    swap_modules(model, cfg, qwen_moe)
    ep = export_model(model)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    # the attention mask transformers builds is gone: only the model's dataflow is left
    assert targets <= {"aten.embedding.default", "ktc.rope.default", "<built-in function getitem>",
                       "ktc.rms_norm.default", "ktc.attention.default", "ktc.moe.default",
                       "aten.add.Tensor", "aten.alias.default", "aten.linear.default"}, targets
    ids = next(n for n in ep.graph.nodes if n.name == "input_ids")
    assert all(not isinstance(d, int) for d in ids.meta["val"].shape)
    moe = next(n for n in ep.graph.nodes if str(n.target) == "ktc.moe.default")
    spec = decode_spec(moe.args[2])
    assert spec["roles"][:3] == ["router.weight", "experts.gate_up", "experts.down"]
    assert spec["roles"][-1] == "shared.output_gate"
    params = ep.graph_signature.inputs_to_parameters
    assert params[moe.args[1][1].name] == "model.layers.0.mlp.experts.gate_up_proj"


def test_importer_refuses_unknown_ops():
    from ktc.capture.importer import CaptureError, import_program

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, 4))

        def forward(self, input_ids, positions):
            return torch.nn.functional.embedding(input_ids, self.w) * 2.0

    ep = torch.export.export(M(), (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)))
    with pytest.raises(CaptureError, match="aten.mul"):
        import_program(ep, lambda fqn: (fqn, {"load": fqn}), {"load": "lm_head.weight"}, lambda s: "float32", {})
