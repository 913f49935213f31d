"""Orbax checkpoints: round trip, last K + best, fallback past a corrupt step."""

import gc
import glob
import logging
import os
import shutil
import sys
import time
import types

import jax
import numpy as np
import pytest

import jaxnets
from train import optim, steps
from train.checkpoint import CheckpointError, Checkpointer


def _state(seed=0):
    parts, params, stats = steps.split_model(jaxnets.create_model("lenet5", seed=seed))
    groups = optim.param_groups(list(params), model_or_class=parts.model_class,
                                lr_mult=[("fc3", 10.0)])
    tx = optim.make_optimizer(params, groups, name="adamw", lr=1e-3, total_steps=10)
    return steps.init_state(params, stats, tx, seed)


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_round_trip_keeps_last_k_and_best(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2)
    states = {s: _state(seed=s) for s in (1, 2, 3, 4)}
    ck.save(1, states[1], {"epoch": 0}, val_top1=0.9)   # the best
    ck.save(2, states[2], {"epoch": 1}, val_top1=0.5)
    ck.save(3, states[3], {"epoch": 1})                 # mid-epoch, no metric
    ck.save(4, states[4], {"epoch": 2}, val_top1=0.7)
    assert ck.steps() == [1, 3, 4] and ck.best_step() == 1
    step, state, meta = ck.restore(_state())
    assert step == 4 and meta == {"epoch": 2} and _equal(state, states[4])
    assert not _equal(state, states[3])
    _, best, _ = ck.restore(_state(), step=1)
    assert _equal(best, states[1])
    ck.close()
    # A fresh manager on the same directory sees the same checkpoints.
    again = Checkpointer(str(tmp_path / "ck"), keep=2)
    assert again.steps() == [1, 3, 4]
    assert Checkpointer(str(tmp_path / "empty")).restore(_state()) is None


def _corrupt(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
             if os.path.isfile(f) and "/d/" in f]
    assert files, f"no array data files under {step_dir}"
    for f in files:
        with open(f, "wb") as fh:
            fh.write(b"\x00garbage" * 3)


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path / "ck"), keep=3)
    good = _state(seed=5)
    ck.save(10, good, {"epoch": 0})
    ck.save(20, _state(seed=6), {"epoch": 1})
    _corrupt(str(tmp_path / "ck" / "20"))
    reports = []
    hook = sys.unraisablehook
    sys.unraisablehook = reports.append
    try:
        with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
            step, state, meta = ck.restore(_state())
        time.sleep(1.0)  # the failed restore's other reads finish meanwhile
        gc.collect()
        # What is not a late read's callback still reaches the hook before.
        other = types.SimpleNamespace(object=None, exc_value=RuntimeError("something else"))
        sys.unraisablehook(other)
    finally:
        sys.unraisablehook = hook
    assert reports == [other], [str(r.exc_value) for r in reports]
    # Nor asyncio's records of those reads' own errors, never retrieved.
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text[-2000:]
    assert step == 10 and meta == {"epoch": 0} and _equal(state, good)
    assert any("step 20" in r.getMessage() and "unreadable" in r.getMessage()
               for r in caplog.records)
    assert any("resumed from step 10" in r.getMessage() and "20.unreadable" in r.getMessage()
               for r in caplog.records)
    # Moved aside, not deleted: step 20 is free for the resumed run's own checkpoint.
    aside = tmp_path / "ck" / "20.unreadable"
    assert aside.is_dir() and ck.steps() == [10]
    assert glob.glob(str(aside / "state" / "**" / "d" / "*"), recursive=True)
    again = _state(seed=7)
    ck.save(20, again, {"epoch": 1})
    assert Checkpointer(str(tmp_path / "ck"), keep=3).steps() == [10, 20]
    step, state, _ = ck.restore(_state())
    assert step == 20 and _equal(state, again)
    # Nothing readable: an error, and nothing is moved.
    _corrupt(str(tmp_path / "ck" / "20"))
    _corrupt(str(tmp_path / "ck" / "10"))
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ck.restore(_state())
    assert sorted(os.listdir(tmp_path / "ck")) == ["10", "20", "20.unreadable"]


def test_reading_a_run_names_what_is_wrong_with_it(tmp_path, caplog):
    """read_run_weights (train.predict, finetune --eval-only, porting export): a damaged
    model.json is named as such, not taken for unreadable steps; with every step
    unreadable the error gives the newest one's reason, not only the warnings."""
    import json

    from train.checkpoint import read_run_weights

    run = tmp_path / "run"
    ck = Checkpointer(str(run / "checkpoints"), keep=3)
    for step in (1, 2):
        ck.save(step, _state(seed=step), {"epoch": 0})
    ck.close()
    (run / "model.json").write_text(json.dumps({"arch": "lenet5", "num_classes": 10}))
    weights = read_run_weights(str(run), fall_back=True)
    assert weights.step == 2 and weights.arch == "lenet5" and weights.num_classes == 10
    for damaged, reason in (("{\"arch\": ", "Expecting value"),
                            ("[1, 2]", "a JSON list, not an object"),
                            ('{"arch": "lenet5", "model_overrides": 3}', "not iterable")):
        (run / "model.json").write_text(damaged)
        for fall_back in (True, False):
            with pytest.raises(CheckpointError, match=r"model\.json is unreadable: .*" + reason):
                read_run_weights(str(run), fall_back=fall_back)
    (run / "model.json").write_text(json.dumps({"arch": "lenet5", "num_classes": 10}))
    _corrupt(str(run / "checkpoints" / "2"))
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        assert read_run_weights(str(run), fall_back=True).step == 1
    assert any("read step 1 instead of 2" in r.getMessage() for r in caplog.records)
    _corrupt(str(run / "checkpoints" / "1"))
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .* \(steps 1, 2\); "
                       r"the newest: cannot read step 2 in "):
        read_run_weights(str(run), fall_back=True)
    shutil.rmtree(run / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match=r"^cannot read step 1 in "):
        read_run_weights(str(run), fall_back=True)


def test_a_write_that_fails_is_one_error_and_its_noise_is_held_back(tmp_path, capsys, caplog):
    """A full disk: Orbax's writer threads log and print the failure many times; the save
    raises one CheckpointWriteError (finetune: one line, exit 74) and the earlier
    checkpoints stay; a save that succeeds lets its output through."""
    from train.checkpoint import CheckpointWriteError

    ck = Checkpointer(str(tmp_path / "ck"), keep=2)
    ck.save(1, _state(), {"epoch": 0})
    real_save = ck.manager.save

    def noise():
        logging.getLogger("absl").error("writer thread raised: RESOURCE_EXHAUSTED")
        print("Traceback (most recent call last): RuntimeError: Event loop is closed",
              file=sys.stderr)

    def chatty(*args, **kwargs):
        noise()
        return real_save(*args, **kwargs)

    def full(*args, **kwargs):
        noise()
        logging.getLogger("train.data").warning("skipping x.png (1 bad so far)")
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"x\": Failed to write 24350 bytes "
                         "to file 19: No space left on device [os_error_code='28']")

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as finetune's logging.basicConfig
    root.addHandler(handler)
    try:
        ck.manager.save = full
        with pytest.raises(CheckpointWriteError, match=r"cannot write the checkpoint of step 2 "
                           r"in .*: no space left on the device \(the earlier checkpoints"):
            ck.save(2, _state(), {"epoch": 0})
        # Orbax's repeats are dropped; other loggers' records of the moment come through.
        assert capsys.readouterr().err.strip() == "skipping x.png (1 bad so far)"
        ck.manager.save = chatty
        ck.save(3, _state(), {"epoch": 0})
        err = capsys.readouterr().err
        assert "Event loop is closed" in err and "writer thread raised" in err
    finally:
        root.removeHandler(handler)
    assert ck.steps() == [1, 3]
    ck.close()
