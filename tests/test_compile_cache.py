"""jaxnets.compile_cache: the training programs' persistent XLA compilation cache."""

import os
import re
import subprocess
import sys

import jax
import pytest

from jaxnets import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_reads_the_setting_then_the_environment_then_the_default(tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("JAXNETS_CACHE", str(tmp_path / "jaxnets"))
    assert compile_cache.resolve() == str(tmp_path / "jaxnets" / "xla")
    monkeypatch.delenv("JAXNETS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == str(tmp_path / "xdg" / "jaxnets" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve() == str(tmp_path / "home" / ".cache" / "jaxnets" / "xla")
    monkeypatch.setenv(compile_cache.ENV_VAR, "Off")
    assert compile_cache.resolve() is None
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve() == str(tmp_path / "env")
    assert compile_cache.resolve("~/c") == str(tmp_path / "home" / "c")
    assert compile_cache.resolve("off") is None
    with pytest.raises(compile_cache.CompileCacheError, match="empty"):
        compile_cache.resolve("  ")


def test_an_unusable_directory_is_an_error_when_asked_for_and_a_warning_by_default(
        tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        with pytest.raises(compile_cache.CompileCacheError, match=re.escape(str(blocker / "c"))):
            compile_cache.enable(str(blocker / "c"))
        monkeypatch.setenv(compile_cache.ENV_VAR, str(blocker / "env"))
        with pytest.raises(compile_cache.CompileCacheError, match="give another directory"):
            compile_cache.enable()
        monkeypatch.delenv(compile_cache.ENV_VAR)
        monkeypatch.delenv("JAXNETS_CACHE", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
        with pytest.warns(UserWarning, match="no compilation cache"):
            assert compile_cache.enable() is None
        assert jax.config.jax_compilation_cache_dir is None  # nothing was switched on
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def _finetune(tmp_path, name, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")
           and k not in ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAXNETS_CACHE",
                         "XDG_CACHE_HOME", compile_cache.ENV_VAR)}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home"))
    args = ["--arch", "lenet5", "--dataset", "digits", "--weights", "none", "--steps", "2",
            "--no-progress", "--output-dir", str(tmp_path / name), *extra]
    return subprocess.run([sys.executable, "-m", "train.finetune", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_second_run_reads_every_program_back_and_gets_the_same_result(tmp_path):
    # The first run takes the default folder (under $HOME/.cache), the second names it.
    cache = tmp_path / "home" / ".cache" / "jaxnets" / "xla"

    def read_back(r):
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(rf"compilation cache {re.escape(str(cache))}: (\d+) of (\d+) programs "
                      "read back", r.stderr)
        assert m, r.stderr[-2000:]
        return int(m[1]), int(m[2])

    first = _finetune(tmp_path, "run1")
    hits1, total1 = read_back(first)
    # The first run compiles and writes each program (the initialisers' too, however
    # short their compile).
    assert hits1 == 0 and total1 >= 10 and len(os.listdir(cache)) >= total1
    # The train step's entries truncated (a process killed while writing them): the
    # second run reads every other program back, compiles those again (jax warns) and
    # gets the same result.
    truncated = list(cache.glob("jit_step-*-cache"))
    assert truncated
    for f in truncated:
        f.write_bytes(f.read_bytes()[:64])
    second = _finetune(tmp_path, "run2", "--compile-cache", str(cache))
    assert read_back(second) == (total1 - len(truncated), total1)
    assert "Error reading persistent compilation cache entry for 'jit_step'" in second.stderr
    val = [re.search(r"val top-1 .*\(", r.stdout)[0] for r in (first, second)]
    assert val[0] == val[1]


def test_off_turns_a_cache_jax_was_given_off_and_a_folder_on_again(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    limits = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_max_size", "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "given"))
    try:
        assert compile_cache.enable() == str(tmp_path / "given")  # jax's own setting kept
        assert compile_cache.summary().startswith(f"compilation cache {tmp_path / 'given'}: ")
        assert compile_cache.enable("off") is None
        assert not jax.config.jax_enable_compilation_cache
        assert compile_cache.summary() is None
        # A folder named afterwards turns it on again.
        assert compile_cache.enable(str(tmp_path / "named")) == str(tmp_path / "named")
        assert jax.config.jax_enable_compilation_cache
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "named")
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", before)
        for k, v in limits.items():  # the suite's shared folder evicts nothing
            jax.config.update(k, v)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()


def test_the_programs_name_an_unusable_directory_in_one_line(tmp_path, capsys):
    from jaxnets import attention_maps
    from porting import verify
    from train import finetune, seq2seq

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = str(blocker / "cache")
    assert finetune.main(["--arch", "lenet5", "--dataset", "digits", "--weights", "none",
                          "--compile-cache", bad, "--output-dir", str(tmp_path / "run")]) == 2
    assert seq2seq.main(["--steps", "1", "--compile-cache", bad, "--out", ""]) == 2
    assert verify.main(["--arch", "lenet5", "--compile-cache", bad]) == 2
    assert attention_maps.main(["--out", str(tmp_path / "a.png"), "--compile-cache", bad]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith(f"error: --compile-cache: compilation cache "
                                                 f"{bad}: ") for line in err), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "a.png").exists()
