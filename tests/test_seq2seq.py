"""train.seq2seq: a short run learns the task; data, checkpoint and CLI behave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train import seq2seq
from train.seq2seq import BOS, EOS, PAD, Config

ROOT = Path(__file__).resolve().parents[1]
# Bar for the short run below: reverse on lengths 2-6 reaches 100% here in 300 steps;
# 250 steps must give at least 90% exact sequences on held-out data.
SHORT = dict(task="reverse", steps=250, batch_size=64, min_len=2, max_len=6, eval_size=300,
             progress=False)
BAR = 0.90


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq2seq")
    config = Config(**SHORT, out=str(out))
    return config, seq2seq.train(config)


def test_short_run_learns_reverse(short_run):
    config, result = short_run
    assert result.accuracy >= BAR, f"held-out exact-sequence accuracy {result.accuracy:.3f}"
    assert result.loss < 0.3


def test_checkpoint_restores_the_trained_model(short_run):
    config, result = short_run
    assert result.checkpoint and Path(result.checkpoint).is_dir()
    model, restored = seq2seq.load_checkpoint(config.out)
    assert restored == config
    eval_set = seq2seq.make_batch(np.random.default_rng([config.seed, 1]), config,
                                  config.eval_size, held_out=True)
    preds = jax.jit(lambda src: seq2seq.greedy_decode(model, src, config.max_len + 1))(
        eval_set["src"])
    acc = seq2seq.exact_match(np.asarray(preds), eval_set["tgt_out"]).mean()
    assert acc == pytest.approx(result.accuracy)
    with pytest.raises(FileNotFoundError, match="no seq2seq run"):
        seq2seq.load_checkpoint(str(Path(config.out) / "nowhere"))


@pytest.mark.parametrize("task", seq2seq.TASKS)
def test_batches_are_well_formed(task):
    config = Config(task=task, min_len=2, max_len=7)
    batch = seq2seq.make_batch(np.random.default_rng(0), config, 200, held_out=False)
    src, tgt_in, tgt_out = batch["src"], batch["tgt_in"], batch["tgt_out"]
    assert src.shape == (200, 7) and tgt_in.shape == tgt_out.shape == (200, 8)
    assert not seq2seq.is_held_out(src).any()
    lengths = (src != PAD).sum(1)
    assert lengths.min() >= 2 and lengths.max() <= 7 and len(set(lengths)) > 1
    for s, ti, to, n in zip(src, tgt_in, tgt_out, lengths):
        seq = s[:n]
        want = {"reverse": seq[::-1], "sort": np.sort(seq), "copy": seq}[task]
        assert (s[n:] == PAD).all() and ti[0] == BOS
        np.testing.assert_array_equal(ti[1:n + 1], want)
        np.testing.assert_array_equal(to[:n], want)
        assert to[n] == EOS and (to[n + 1:] == PAD).all()
    held = seq2seq.make_batch(np.random.default_rng(1), config, 100, held_out=True)
    assert seq2seq.is_held_out(held["src"]).all()
    fraction = seq2seq.is_held_out(np.random.default_rng(2).integers(0, 10, (5000, 7))).mean()
    assert 0.05 < fraction < 0.15


def test_exact_match_needs_every_token_and_eos():
    tgt = np.array([[3, 2, EOS, PAD], [1, EOS, PAD, PAD]])
    preds = np.array([[3, 2, EOS, 7], [1, 4, PAD, PAD]])
    np.testing.assert_array_equal(seq2seq.exact_match(preds, tgt), [True, False])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        seq2seq.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text, name


def test_config_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        seq2seq.parse_args(["--min-len", "9", "--max-len", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--min-len 9, --max-len 4" in err and "\n" not in err
    assert seq2seq.parse_args(["--task", "sort", "--steps", "7"]) == Config(task="sort", steps=7)


def test_cli_rejects_unknown_task():
    proc = subprocess.run([sys.executable, "-m", "train.seq2seq", "--task", "rotate"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: argument --task: invalid choice: 'rotate'")
    assert "reverse" in lines[0]


def test_an_out_that_cannot_be_made_fails_before_training(tmp_path, capsys, monkeypatch):
    def trained(config):
        raise AssertionError("trained before --out was checked")

    monkeypatch.setattr(seq2seq, "train", trained)
    f = tmp_path / "file"
    f.write_text("keep")
    for out, needle in ((f, "a file, not a directory"),
                        (f / "run", f"{f} is a file, not a directory")):
        assert seq2seq.main(["--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --out {out}: {needle}", err
    assert f.read_text() == "keep"


TINY = ["--d-model", "32", "--nhead", "2", "--num-encoder-layers", "1",
        "--num-decoder-layers", "1", "--dim-feedforward", "64", "--batch-size", "8",
        "--eval-size", "16", "--no-progress"]


def test_ctrl_c_saves_the_model_so_far_and_exits_130(tmp_path, capsys, monkeypatch):
    import os
    import signal

    calls = []
    real = seq2seq.make_batch

    def batch(*args, **kwargs):  # the held-out set, then one batch per step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, during step 2
        return real(*args, **kwargs)

    monkeypatch.setattr(seq2seq, "make_batch", batch)
    out = tmp_path / "run"
    assert seq2seq.main(["--steps", "500", "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 2 of 500: the model so far saved in {out}" in err, err
    assert "Traceback" not in err and len(calls) == 3
    model, config = seq2seq.load_checkpoint(str(out))
    assert config.steps == 500 and model is not None
    # The folder now holds a run: rerunning into it is allowed, with a note;
    # a folder of other files is refused before any training.
    monkeypatch.setattr(seq2seq, "make_batch", real)
    assert seq2seq.main(["--steps", "1", "--out", str(out), *TINY]) == 0
    assert f"the run in {out} is replaced" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert seq2seq.main(["--steps", "1", "--out", str(other), *TINY]) == 2
    assert "holds other files and no seq2seq run" in capsys.readouterr().err
    assert os.listdir(other) == ["notes.txt"]


def test_a_save_stopped_midway_leaves_the_earlier_run(tmp_path, capsys, monkeypatch):
    """The new run is written beside the old one and replaces it only once whole: a
    save killed (here: a second Ctrl-C) inside Orbax keeps the earlier model loadable;
    a Ctrl-C during the last evaluation still saves."""
    import orbax.checkpoint as ocp

    out = tmp_path / "run"
    assert seq2seq.main(["--steps", "2", "--out", str(out), *TINY]) == 0
    assert "note: --warmup-steps 200 is not below the run's 2 steps: the warmup is cut to 1" \
        in capsys.readouterr().err
    before, first = seq2seq.load_checkpoint(str(out))
    real_save = ocp.StandardCheckpointer.save

    def interrupted(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", interrupted)
    # Another run (another seed: the same programs, which the suite's compilation cache
    # then holds).
    assert seq2seq.main(["--steps", "3", "--seed", "1", "--out", str(out), *TINY]) == 130
    assert "interrupted: stopped at once, nothing saved" in capsys.readouterr().err
    model, config = seq2seq.load_checkpoint(str(out))
    assert config == first and sorted(p.name for p in out.iterdir()) == ["checkpoint",
                                                                          "config.json"]
    monkeypatch.undo()
    import os
    import signal

    real_eval = seq2seq.exact_match
    monkeypatch.setattr(seq2seq, "exact_match", lambda *a: (os.kill(os.getpid(), signal.SIGINT),
                                                            real_eval(*a))[1])
    assert seq2seq.main(["--steps", "3", "--seed", "1", "--out", str(out), *TINY]) == 0
    assert seq2seq.load_checkpoint(str(out))[1].seed == 1


def test_finetune_and_seq2seq_keep_out_of_each_others_runs(tmp_path, capsys):
    from train import finetune

    s2s = tmp_path / "s2s"
    assert seq2seq.main(["--steps", "1", "--out", str(s2s), *TINY]) == 0
    capsys.readouterr()
    assert finetune.main(["--arch", "mlp", "--dataset", "digits", "--weights", "none",
                          "--image-size", "8", "--steps", "1", "--no-progress",
                          "--output-dir", str(s2s)]) == 2
    assert "holds a train.seq2seq run, not a train.finetune run" in capsys.readouterr().err
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.json").write_text('{"arch": "mlp", "dataset": "digits"}')
    assert seq2seq.main(["--steps", "1", "--out", str(ft), *TINY]) == 2
    assert "holds another program's run" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="config.json is another program's"):
        seq2seq.load_checkpoint(str(ft))
    (ft / "config.json").write_text('{"arch": "ml')
    assert finetune.main(["--arch", "mlp", "--dataset", "digits", "--weights", "none",
                          "--output-dir", str(ft), "--no-progress"]) == 2
    assert "config.json is damaged (" in capsys.readouterr().err
