"""The placement grid, its one-line summary, the PNG picture and `ktc inspect --png`."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from ktc.ir import Graph
from ktc.passes.manager import PassContext, PassManager
from ktc.passes.pipeline import DEFAULT_PIPELINE
from ktc.passes.placement import GPU_RESERVE_BYTES, expert_gpu_bytes, kv_cache_bytes, placement
from ktc.placement_picture import (
    DENSE,
    gpu_traffic_share,
    legend_height,
    placement_grid,
    placement_summary,
    write_placement_png,
)

# Layer 0's hottest experts are 1, 4, 0; layer 1's are 3, 7. With room for five experts placement
# gives layer 0 three and layer 1 two (round robin, hottest first).
CALIBRATION = {0: [10, 50, 1, 1, 30, 1, 1, 6], 1: [1, 1, 1, 80, 1, 1, 5, 10]}
GPU_EXPERTS = {0: {0, 1, 4}, 1: {3, 7}}
E = 8


def _budget(graph: Graph, experts: int) -> int:
    """A --gpu-memory that fits the dense part, the KV cache, the reserve, `experts` bf16 experts and
    the staging buffer for the largest CPU share of a layer."""
    from ktc.passes.placement import _gpu_dense_bytes

    max_context = int(graph.config["max_position_embeddings"])
    moe = graph.nodes_of("moe_experts")[0]
    from ktc.passes.placement import expert_cpu_int8_bytes

    layers = len(graph.nodes_of("moe_experts"))
    stream = (E - experts // layers) * expert_cpu_int8_bytes(moe)     # the int8 prefill staging buffer
    return (_gpu_dense_bytes(graph) + kv_cache_bytes(graph, max_context) + GPU_RESERVE_BYTES + stream
            + int(expert_gpu_bytes(moe, "none") * experts))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from ktc.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("picture") / "qwen3"
    make_tiny_model("qwen3_moe", folder, num_layers=2)
    return folder


@pytest.fixture(scope="module")
def captured(model) -> Graph:
    from ktc.capture import capture

    return capture(model)


def _lower(graph: Graph, calibration=None, passes=DEFAULT_PIPELINE) -> Graph:
    ctx = PassContext(target="cuda", gpu_memory_bytes=_budget(graph, 5),
                      options={"calibration": calibration} if calibration else {})
    return PassManager(passes).run(graph, ctx)


@pytest.fixture(scope="module")
def hetero(captured) -> Graph:
    return _lower(captured, CALIBRATION)


def _decode_png(data: bytes) -> tuple[int, int, list[bytes], dict[str, str]]:
    """(width, height, RGB rows, tEXt) of an 8-bit RGB, non-interlaced PNG with filter 0 rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, text, kinds = 8, b"", {}, []
    header = None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        kinds.append(kind)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    width, height, depth, colour, _, _, interlace = header
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, [r[1:] for r in rows], text


def _cell_rgb(rows: list[bytes], layer: int, expert: int, cell: int) -> tuple[int, int, int]:
    y, x = layer * cell + cell // 2 - 1, expert * cell + cell // 2 - 1
    return tuple(rows[y][3 * x:3 * x + 3])


def _is_green(rgb) -> bool:
    r, g, b = rgb
    return g > r and g > b


def _is_blue(rgb) -> bool:
    r, g, b = rgb
    return b > r and b > g


def test_grid_shows_each_router_expert_on_the_device_placement_chose(hetero):
    assert len(hetero.nodes_of("moe_experts")) == 4       # split into .gpu / .cpu per layer
    rows = placement_grid(hetero)
    assert [r.layer for r in rows] == [0, 1]
    for row in rows:
        assert len(row.experts) == E and not row.dense
        gpu = {e for e, c in enumerate(row.experts) if c.device == "cuda"}
        cpu = {e for e, c in enumerate(row.experts) if c.device == "cpu"}
        assert gpu == GPU_EXPERTS[row.layer] and cpu == set(range(E)) - gpu
        counts = CALIBRATION[row.layer]
        assert [c.load for c in row.experts] == pytest.approx([c / sum(counts) for c in counts])


def test_grid_is_the_same_before_and_after_the_expert_split(captured, hetero):
    mixed = _lower(captured, CALIBRATION, passes=[placement])
    assert {n.device for n in mixed.nodes_of("moe_experts")} == {"mixed"}
    assert placement_grid(mixed) == placement_grid(hetero)


def test_summary_counts_experts_and_the_gpu_share_of_traffic(captured, hetero):
    line = placement_summary(hetero)
    # layer 0: 0.1 + 0.5 + 0.3; layer 1: 0.8 + 0.1 -> 90% of routed slots on the GPU
    assert "5 routed experts on the GPU, 11 on the CPU" in line and "90.0%" in line and "calibration" in line
    uniform = _lower(captured)
    assert gpu_traffic_share(placement_grid(uniform)) == pytest.approx((3 / 8 + 2 / 8) / 2)
    assert "uniform" in placement_summary(uniform)
    cpu_only = PassManager(DEFAULT_PIPELINE).run(captured, PassContext(target="cpu"))
    assert "0 routed experts on the GPU, 16 on the CPU" in placement_summary(cpu_only)
    assert "0.0%" in placement_summary(cpu_only)


@pytest.mark.parametrize("cell", [3, 10])
def test_png_has_a_cell_per_layer_and_expert_coloured_by_device_and_load(hetero, tmp_path, cell):
    path = write_placement_png(hetero, tmp_path / "p.png", cell=cell)
    width, height, rows, text = _decode_png(path.read_bytes())
    assert (width, height) == (E * cell, 2 * cell + legend_height(cell))
    assert "green: GPU" in text["Description"] and "90.0%" in text["Description"]
    for layer, gpu in GPU_EXPERTS.items():
        for e in range(E):
            rgb = _cell_rgb(rows, layer, e, cell)
            assert (_is_green if e in gpu else _is_blue)(rgb), (layer, e, rgb)
    # hotter is brighter, on either device
    assert sum(_cell_rgb(rows, 0, 1, cell)) > sum(_cell_rgb(rows, 0, 0, cell))     # GPU: 0.5 vs 0.1
    assert sum(_cell_rgb(rows, 1, 3, cell)) > sum(_cell_rgb(rows, 1, 7, cell))     # GPU: 0.8 vs 0.1
    assert sum(_cell_rgb(rows, 0, 7, cell)) > sum(_cell_rgb(rows, 0, 2, cell))     # CPU: 0.06 vs 0.01
    # the legend strip: GPU scale on the left, CPU scale on the right, each cold to hot
    strip = rows[-1]
    left, right = tuple(strip[0:3]), tuple(strip[3 * (width - 1):])
    assert _is_green(left) and _is_blue(right)
    assert sum(strip[3 * (width // 2 - 1):3 * (width // 2)]) > sum(left)


def test_png_without_calibration_shades_every_expert_alike(captured, tmp_path):
    cell = 8
    g = _lower(captured)
    _, _, rows, _ = _decode_png(write_placement_png(g, tmp_path / "u.png", cell=cell).read_bytes())
    gpu = {_cell_rgb(rows, r.layer, e, cell) for r in placement_grid(g) for e, c in enumerate(r.experts)
           if c.device == "cuda"}
    cpu = {_cell_rgb(rows, r.layer, e, cell) for r in placement_grid(g) for e, c in enumerate(r.experts)
           if c.device == "cpu"}
    assert len(gpu) == 1 and len(cpu) == 1
    assert _is_green(gpu.pop()) and _is_blue(cpu.pop())


def test_a_layer_without_routed_experts_is_a_grey_row(hetero, tmp_path):
    g = hetero.copy()
    g.config["num_hidden_layers"] = 3          # as if a third, dense layer followed
    rows = placement_grid(g)
    assert [r.dense for r in rows] == [False, False, True]
    cell = 6
    width, height, pixels, _ = _decode_png(write_placement_png(g, tmp_path / "d.png", cell=cell).read_bytes())
    assert height == 3 * cell + legend_height(cell)
    assert {_cell_rgb(pixels, 2, e, cell) for e in range(E)} == {DENSE}


@pytest.fixture(scope="module")
def hetero_artifact(model, captured, tmp_path_factory) -> Path:
    from ktc.compiler import compile_model

    out = tmp_path_factory.mktemp("picture-artifact") / "hetero.ktc"
    compile_model(model, out, target="cuda", gpu_memory=_budget(captured, 5), options={"calibration": CALIBRATION})
    return out


def test_inspect_png_writes_the_picture_and_prints_the_placement(hetero_artifact, tmp_path, capsys):
    from ktc.cli import main
    from ktc.runtime.artifact import read_manifest

    png = tmp_path / "placement.png"
    assert main(["inspect", str(hetero_artifact), "--png", str(png)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "5 routed experts on the GPU, 11 on the CPU" in printed
    assert "GPU memory plan: budget" in printed and "reserve 512.0 MiB" in printed and "calibrated" in printed
    assert f"wrote the placement picture to {png}" in printed
    grid = placement_grid(read_manifest(hetero_artifact).graph)
    on_gpu = [{e for e, c in enumerate(r.experts) if c.device == "cuda"} for r in grid]
    assert on_gpu == [GPU_EXPERTS[0], GPU_EXPERTS[1]]
    width, height, rows, _ = _decode_png(png.read_bytes())
    cell = 16                                   # the default for 8 experts
    assert (width, height) == (E * cell, 2 * cell + legend_height(cell))
    assert _is_green(_cell_rgb(rows, 1, 3, cell)) and _is_blue(_cell_rgb(rows, 1, 0, cell))


def test_inspect_png_into_a_missing_folder_is_a_one_line_error(hetero_artifact, tmp_path, capsys):
    from ktc.cli import main

    assert main(["inspect", str(hetero_artifact), "--png", str(tmp_path / "nope" / "p.png")]) == 1
    err = capsys.readouterr().err
    assert "does not exist: create it first" in err and len(err.strip().splitlines()) == 1
