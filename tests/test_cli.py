"""jaxnets.cli: what the programs' command lines share."""

import io
import os
import subprocess
import sys

import pytest

from jaxnets.cli import LOG_PROGRESS_INTERVAL, ArgumentParser, one_line, progress_bar


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


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_is_a_line_per_refresh(monkeypatch):
    # Not a terminal (a file, a pipe, the hosts of a TPU pod under gcloud ssh): each
    # refresh is a line of its own, no carriage returns or cursor moves.
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    assert list(progress_bar(range(5), total=5, desc="train", file=log, mininterval=0,
                             miniters=1)) == list(range(5))
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [line.split("|")[0].strip() for line in lines] == ["train:   0%", *(
        f"train:  {20 * i}%" for i in range(1, 5)), "train: 100%"]
    assert all(f"{i}/5" in line for i, line in enumerate(lines))
    assert text.isascii()
    # By default at most one line per LOG_PROGRESS_INTERVAL: the first and the last here,
    # also for a bar closed with leave=False (a log takes nothing back).
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="eval", file=log, leave=False):
        pass
    assert [line.split("|")[0] for line in log.getvalue().splitlines()] == [
        "eval:   0%", "eval: 100%"]
    assert LOG_PROGRESS_INTERVAL >= 10
    # Descriptions with "|" or " [" in them, and long lines, are as they are.
    log = io.StringIO()
    desc = "resnet50 [fold 1] | train " + "x" * 100
    for _ in progress_bar(range(3), desc=desc, file=log, leave=False, mininterval=0,
                          miniters=1):
        pass
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith(desc) for line in lines)
    assert [line.split(desc)[1].split("|")[0] for line in lines] == [
        ":   0%", ":  33%", ":  67%", ": 100%"]
    # A new postfix at the same count is a line; the same state drawn again is not.
    log = io.StringIO()
    with progress_bar(total=2, file=log, mininterval=0, miniters=1) as bar:
        bar.update(2)
        bar.refresh()
        bar.set_postfix(loss="0.1234", refresh=False)
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and "2/2" in lines[1] and lines[2].endswith("loss=0.1234]"), lines
    # tqdm's own variables (read when tqdm is imported) apply.
    script = ("import sys\nfrom jaxnets.cli import progress_bar\n"
              "for _ in progress_bar(range(3), desc='x', miniters=1): pass\n")
    env = {**os.environ, "TQDM_MININTERVAL": "0", "TQDM_NCOLS": "60"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.startswith("x:")]
    assert [line.split("|")[0] for line in lines] == [
        "x:   0%", "x:  33%", "x:  67%", "x: 100%"], out.stderr
    assert all(len(line) == 60 for line in lines), lines
    # A stream whose isatty fails is not a terminal.

    class Broken(io.StringIO):
        def isatty(self):
            raise OSError(9, "Bad file descriptor")

    broken = Broken()
    assert list(progress_bar(range(2), file=broken, mininterval=0, miniters=1)) == [0, 1]
    assert "\r" not in broken.getvalue() and "2/2" in broken.getvalue()


def test_progress_on_a_terminal_is_tqdms_bar_and_comes_after_what_was_printed(monkeypatch):
    tty = _Terminal()
    for _ in progress_bar(range(3), file=tty, mininterval=0, miniters=1):
        pass
    assert tty.getvalue().count("\r") >= 4 and tty.getvalue().count("\n") == 1
    # In a log, what the program printed on stdout is written out before each line.
    events = []

    class Stdout(io.StringIO):
        def flush(self):
            events.append("stdout flushed")

    class Log(io.StringIO):
        def write(self, text):
            events.append("bar")
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Stdout())
    with progress_bar(total=1, file=Log()) as bar:
        bar.update(1)
    assert events and events[0] == "stdout flushed" and "bar" in events
    assert all(events[i - 1] == "stdout flushed" for i, e in enumerate(events) if e == "bar")
