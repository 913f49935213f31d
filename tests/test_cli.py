"""jaxnets.cli: what the programs' command lines share."""

import pytest

from jaxnets.cli import ArgumentParser, one_line


def test_one_line_joins_lines_and_cuts_between_keys():
    assert one_line("state_dict does not fit X:\n  missing 2 (a, b)") == (
        "state_dict does not fit X: missing 2 (a, b)")
    keys = ", ".join(f"layer{i}.weight" for i in range(100))
    cut = one_line(keys, 120)
    assert len(cut) <= 125 and cut.endswith(", ...")
    assert cut[:-5].split(", ")[-1] in keys.split(", ")  # a whole key last, not half of one
    assert one_line("x" * 300, 100) == "x" * 100 + " ..."


def test_usage_errors_are_one_line_and_flags_are_not_shortened(capsys):
    p = ArgumentParser(prog="prog")
    p.add_argument("--warmup-steps", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--warmup", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (
        "error: unrecognized arguments: --warmup 3 (see prog --help)\n")
