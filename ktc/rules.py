"""Placement rules: a small TOML file that overrides where ops and routed experts go.

Like KTransformers' injection rules, a rule matches names with a regular expression:

    # rules.toml — the first rule that matches a name decides
    [[rule]]
    match = 'layers\\.[0-3]\\.mlp\\.experts'   # searched in node names ...
    device = "cuda"                          # ... puts those layers' routed experts on the GPU

    [[rule]]
    match = 'layers\\.\\d+\\.mlp\\.experts\\.(0|1)$'   # one routed expert is "<moe node>.<expert id>"
    device = "cpu"

    [[rule]]
    match = 'experts\\.cpu$'                  # a layer's CPU part (named <moe node>.cpu / .gpu once split)
    format = "int4"                          # its experts' format (int8 | int4 | none)

A rule has `match` and at least one of `device` ("cuda" | "cpu") and `format`. For devices,
routed experts are matched by their own name (`layers.7.mlp.experts.42`) and by their layer's
node name, other ops by node name; a format applies to the nodes a rule matches, including the
parts of a split layer (`layers.7.mlp.experts.cpu` / `.gpu`), and a rule with both a device and
a format sets the format only of that device's part. On a GPU target a format rule (int4 | none)
matching a dense node's name (attention, mlp, linear; never the lm_head) sets the format of its
linear weights, as --gpu-dense-quant does for all. Read with `read_rules`; the placement and
quantization passes apply them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktc.errors import KtcError

DEVICES = ("cuda", "cpu")
FORMATS = ("none", "int8", "int4")


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    device: str | None = None
    format: str | None = None

    def matches(self, name: str) -> bool:
        return self.pattern.search(name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.pattern.pattern, "device": self.device, "format": self.format}


def parse_rules(items: Any, where: str = "rules") -> list[Rule]:
    """Rules from a list of {"match", "device", "format"} tables (or a legacy {regex: device} dict)."""
    if isinstance(items, dict):
        items = [{"match": k, "device": v} for k, v in items.items()]
    if not isinstance(items, list):
        raise KtcError(f"{where}: expected a list of [[rule]] tables")
    rules = []
    for i, item in enumerate(items, 1):
        if isinstance(item, Rule):
            rules.append(item)
            continue
        if not isinstance(item, dict):
            raise KtcError(f"{where}: rule {i} is not a table")
        unknown = sorted(set(item) - {"match", "device", "format"})
        if unknown:
            raise KtcError(f"{where}: rule {i} has unknown key {unknown[0]!r} (keys: match, device, format)")
        pat = item.get("match")
        if not isinstance(pat, str) or not pat:
            raise KtcError(f"{where}: rule {i} needs match = '<regular expression>'")
        try:
            compiled = re.compile(pat)
        except re.error as e:
            raise KtcError(f"{where}: rule {i}: match {pat!r} is not a valid regular expression ({e})") from None
        device, fmt = item.get("device"), item.get("format")
        if device is None and fmt is None:
            raise KtcError(f"{where}: rule {i} ({pat!r}) sets neither device nor format")
        if device is not None and device not in DEVICES:
            raise KtcError(f"{where}: rule {i}: device {device!r} is not one of {', '.join(DEVICES)}")
        if fmt is not None and fmt not in FORMATS:
            raise KtcError(f"{where}: rule {i}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        rules.append(Rule(compiled, device, fmt))
    return rules


def read_rules(path: str | Path) -> list[Rule]:
    """The rules of a TOML file; KtcError (one line) for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise KtcError(f"rules file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KtcError(f"{path} is not valid TOML ({str(e).splitlines()[0]})") from None
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise KtcError(f"{path}: unknown top-level key {unknown[0]!r}; write rules as [[rule]] tables")
    return parse_rules(data.get("rule", []), str(path))


def first_match(rules: list[Rule], names: list[str], key: str) -> str | None:
    """The `key` ("device" / "format") of the first rule that sets it and matches any of `names`."""
    for rule in rules:
        value = getattr(rule, key)
        if value is not None and any(rule.matches(n) for n in names):
            return value
    return None
