"""Where every routed expert runs, as data, as one line of text and as a PNG picture.

The picture has one row per decoder layer (layer 0 at the top) and one column per router
expert id (0 on the left). A cell's hue says which device runs that expert (green: GPU, blue:
CPU) and its brightness how hot the expert is (attrs["expert_load"], the calibration share of
the layer's routed slots; brighter = hotter, relative to the hottest expert of the model; no
calibration: one mid shade). Layers without routed experts (dense layers) are grey rows. Below
the grid a thin strip shows the two scales, GPU cold→hot on the left, CPU cold→hot on the right.

The PNG is written with zlib + struct only: inspecting an artifact must not need an imaging
library. Only the standard library and ktc.ir are imported, so the runtime may use this too.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from ktc.ir import Graph, Node

RGB = tuple[int, int, int]

# (cold, hot) ends of each device's scale; hot is brighter in every channel.
GPU_SCALE: tuple[RGB, RGB] = ((0, 70, 25), (120, 255, 140))
CPU_SCALE: tuple[RGB, RGB] = ((15, 35, 100), (110, 180, 255))
OTHER_SCALE: tuple[RGB, RGB] = ((90, 30, 90), (255, 120, 255))   # placed on a device that is neither
DENSE: RGB = (128, 128, 128)
UNPLACED: RGB = (200, 200, 200)      # a MoE layer whose experts have no device yet (before placement)
SEPARATOR: RGB = (24, 24, 24)
UNKNOWN_LOAD_SHADE = 0.5
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class ExpertCell:
    """One routed expert of one layer: the device that runs it and its calibration share."""

    device: str | None
    load: float | None        # share of the layer's routed slots; None: no calibration


@dataclass(frozen=True)
class LayerRow:
    """One decoder layer: its routed experts by router id, or none for a dense layer."""

    layer: int
    experts: list[ExpertCell]

    @property
    def dense(self) -> bool:
        return not self.experts


def is_gpu_device(device: str | None) -> bool:
    return device is not None and device not in ("cpu", "mixed")


def _layer_of(node: Node, fallback: int) -> int:
    if "layer" in node.attrs:
        return int(node.attrs["layer"])
    m = _LAYER.search(node.name)
    return int(m.group(1)) if m else fallback


def _expert_devices(node: Node) -> dict[int, str | None]:
    """Router expert id -> device for the experts one moe_experts node holds."""
    if "experts" in node.attrs:
        return {int(e): node.device for e in node.attrs["experts"]}
    e = int(node.attrs["num_experts"])
    if node.device == "mixed":   # placement ran, expert_split not yet
        gpu = {int(x) for x in node.attrs.get("gpu_experts", [])}
        return {i: ("cuda" if i in gpu else "cpu") for i in range(e)}
    return {i: node.device for i in range(e)}


def placement_grid(graph: Graph) -> list[LayerRow]:
    """Per decoder layer (in order), per router expert id: device and calibration load.

    Layers are the union of attention layers, MoE layers and config["num_hidden_layers"];
    a layer with no moe_experts node is dense (an empty row)."""
    devices: dict[int, dict[int, str | None]] = {}
    loads: dict[int, list[float]] = {}
    widths: dict[int, int] = {}
    for i, node in enumerate(graph.nodes_of("moe_experts")):
        layer = _layer_of(node, i)
        devices.setdefault(layer, {}).update(_expert_devices(node))
        widths[layer] = max(widths.get(layer, 0),
                            int(node.attrs.get("num_global_experts", node.attrs["num_experts"])))
        if node.attrs.get("expert_load") is not None:
            loads[layer] = [float(x) for x in node.attrs["expert_load"]]
    layers = set(devices)
    layers.update(int(n.attrs["layer"]) for n in graph.nodes_of("attention") if "layer" in n.attrs)
    count = max([int(graph.config.get("num_hidden_layers") or 0)] + [x + 1 for x in layers])
    rows = []
    for layer in range(count):
        if layer not in devices:
            rows.append(LayerRow(layer, []))
            continue
        load = loads.get(layer)
        rows.append(LayerRow(layer, [
            ExpertCell(devices[layer].get(e), load[e] if load is not None and e < len(load) else None)
            for e in range(widths[layer])
        ]))
    return rows


def gpu_traffic_share(rows: list[LayerRow]) -> float | None:
    """Share of all routed slots that GPU experts serve: per layer the GPU experts' summed load
    (uniform 1/E without calibration), averaged over MoE layers (each serves top_k per token)."""
    shares = []
    for row in rows:
        if row.dense:
            continue
        if all(c.load is not None for c in row.experts):
            total = sum(c.load for c in row.experts) or 1.0
            shares.append(sum(c.load for c in row.experts if is_gpu_device(c.device)) / total)
        else:
            shares.append(sum(1 for c in row.experts if is_gpu_device(c.device)) / len(row.experts))
    return sum(shares) / len(shares) if shares else None


def placement_summary(graph: Graph) -> str:
    """One line: how many routed experts run on the GPU and the CPU, and the GPU's share of traffic."""
    rows = placement_grid(graph)
    cells = [c for r in rows for c in r.experts]
    if not cells:
        return "placement: no routed experts (dense model)"
    gpu = sum(1 for c in cells if is_gpu_device(c.device))
    cpu = sum(1 for c in cells if c.device == "cpu")
    share = gpu_traffic_share(rows)
    calibrated = all(c.load is not None for c in cells)
    basis = "by calibration" if calibrated else "assuming uniform routing (no calibration)"
    moe_layers = sum(1 for r in rows if not r.dense)
    return (f"placement: {gpu} routed experts on the GPU, {cpu} on the CPU ({moe_layers} MoE layers); "
            f"the GPU experts serve {100 * (share or 0.0):.1f}% of routed traffic {basis}")


def _mix(scale: tuple[RGB, RGB], t: float) -> RGB:
    t = min(1.0, max(0.0, t))
    lo, hi = scale
    return tuple(round(a + (b - a) * t) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _scale_of(device: str | None) -> tuple[RGB, RGB] | None:
    if device is None:
        return None
    if device == "cpu":
        return CPU_SCALE
    return GPU_SCALE if is_gpu_device(device) else OTHER_SCALE


def cell_colour(cell: ExpertCell, hottest: float) -> RGB:
    """A cell's colour: its device's hue, brightness from load relative to `hottest`.

    The square root spreads the cold end, where most experts of a skewed router sit."""
    scale = _scale_of(cell.device)
    if scale is None:
        return UNPLACED
    if cell.load is None or hottest <= 0:
        return _mix(scale, UNKNOWN_LOAD_SHADE)
    return _mix(scale, (max(0.0, cell.load) / hottest) ** 0.5)


def default_cell(columns: int) -> int:
    """Pixels per cell so that the picture is about 1000 px wide at most (2..16)."""
    return max(2, min(16, 1024 // max(1, columns)))


def picture_size(rows: list[LayerRow], cell: int) -> tuple[int, int]:
    """(width, height) of the PNG: the layer × expert grid plus the legend strip below it."""
    columns = max([len(r.experts) for r in rows] + [1])
    return columns * cell, max(1, len(rows)) * cell + legend_height(cell)


def legend_height(cell: int) -> int:
    return max(3, cell // 2) + 1    # one separator row, then the strip


def render_placement(graph: Graph, cell: int | None = None) -> tuple[int, int, list[bytearray]]:
    """The picture as (width, height, rows of RGB bytes)."""
    grid = placement_grid(graph)
    columns = max([len(r.experts) for r in grid] + [1])
    cell = cell or default_cell(columns)
    if cell < 1:
        raise ValueError(f"cell must be at least 1 pixel, got {cell}")
    width, height = picture_size(grid, cell)
    hottest = max([c.load for r in grid for c in r.experts if c.load is not None] + [0.0])
    gap = 1 if cell >= 4 else 0      # a dark line between cells once they are big enough to spare it
    pixels: list[bytearray] = []
    for row in grid or [LayerRow(0, [])]:
        colours = [cell_colour(c, hottest) for c in row.experts] + [DENSE] * (columns - len(row.experts))
        line = bytearray()
        for colour in colours:
            line += bytes(colour) * (cell - gap) + bytes(SEPARATOR) * gap
        pixels.extend(bytearray(line) for _ in range(cell - gap))
        pixels.extend(bytearray(bytes(SEPARATOR) * width) for _ in range(gap))
    pixels.append(bytearray(bytes(SEPARATOR) * width))
    half = max(1, width // 2)
    strip = bytearray()
    for x in range(width):
        scale, t = (GPU_SCALE, x / max(1, half - 1)) if x < half else (CPU_SCALE, (x - half) / max(1, width - half - 1))
        strip += bytes(_mix(scale, t))
    pixels.extend(bytearray(strip) for _ in range(legend_height(cell) - 1))
    assert len(pixels) == height and all(len(p) == 3 * width for p in pixels)
    return width, height, pixels


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rows: list[bytearray], text: dict[str, str] | None = None) -> bytes:
    """An 8-bit RGB PNG (filter 0 on every scanline) with optional tEXt chunks (Latin-1)."""
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        out += _chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
    return out + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def write_placement_png(graph: Graph, path: str | Path, cell: int | None = None) -> Path:
    """Write the placement picture of `graph` to `path` (see the module docstring for how to read it)."""
    width, height, rows = render_placement(graph, cell)
    text = {
        "Title": f"ktc expert placement: {graph.config.get('model_type', 'model')}",
        "Description": ("rows: decoder layers, first at the top; columns: router expert ids, 0 on the left; "
                        "green: GPU, blue: CPU, grey: dense layer; brighter: hotter (calibration share); "
                        "bottom strip: GPU scale cold to hot, then CPU scale cold to hot. "
                        + placement_summary(graph)),
        "Software": "ktc",
    }
    path = Path(path)
    path.write_bytes(encode_png(width, height, rows, text))
    return path
