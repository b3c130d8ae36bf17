import pytest

from ktc.errors import KtcError
from ktc.rules import first_match, parse_rules, read_rules


def test_rules_file_round_trip(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text("[[rule]]\nmatch = 'layers\\.[0-3]\\.mlp\\.experts'\ndevice = 'cuda'\n\n"
                 "[[rule]]\nmatch = 'experts\\.cpu$'\nformat = 'int4'\n")
    rules = read_rules(p)
    assert [(r.pattern.pattern, r.device, r.format) for r in rules] == [
        (r"layers\.[0-3]\.mlp\.experts", "cuda", None), (r"experts\.cpu$", None, "int4")]
    assert first_match(rules, ["layers.2.mlp.experts.5"], "device") == "cuda"
    assert first_match(rules, ["layers.9.mlp.experts.5"], "device") is None
    assert first_match(rules, ["layers.9.mlp.experts.cpu"], "format") == "int4"


@pytest.mark.parametrize("text, message", [
    ("[[rule]\n", "not valid TOML"),
    ("[[rule]]\ndevice = 'cpu'\n", "needs match"),
    ("[[rule]]\nmatch = '('\ndevice = 'cpu'\n", "not a valid regular expression"),
    ("[[rule]]\nmatch = 'x'\n", "sets neither device nor format"),
    ("[[rule]]\nmatch = 'x'\ndevice = 'tpu'\n", "device 'tpu' is not one of cuda, cpu"),
    ("[[rule]]\nmatch = 'x'\nformat = 'fp8'\n", "format 'fp8' is not one of"),
    ("[[rule]]\nmatch = 'x'\ndevice = 'cpu'\nwhere = 1\n", "unknown key 'where'"),
    ("[rules]\nx = 1\n", "unknown top-level key 'rules'"),
])
def test_bad_rules_files_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "rules.toml"
    p.write_text(text)
    with pytest.raises(KtcError, match=message) as e:
        read_rules(p)
    assert "\n" not in e.value.message


def test_missing_rules_file(tmp_path):
    with pytest.raises(KtcError, match="does not exist"):
        read_rules(tmp_path / "nope.toml")


def test_legacy_dict_rules():
    assert [(r.pattern.pattern, r.device) for r in parse_rules({"experts$": "cpu"})] == [("experts$", "cpu")]
