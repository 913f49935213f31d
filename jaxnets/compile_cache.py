"""jax's persistent compilation cache for the training programs.

Each run of a program compiles the same XLA programs again: the model's
initialisers (eagerly, one program per parameter shape: GoogLeNet has 49, each
~0.3 s to compile on the development machine's 2 CPU cores, as ``JAX_LOG_COMPILES=1``
shows), the train and eval steps. For a short run that is most of its time.
``python -m train.finetune --arch googlenet --dataset digits --weights none --steps 1
--batch-size 16`` took 50.5 s wall the first time and 14.6 s the second, which read
all 177 programs back from the cache (the same validation figures); LeNet-5
(``--steps 2``) 12.5 and 6.0 s.

:func:`enable` turns the cache on. The programs (``python -m train.finetune``,
``train.seq2seq``, ``porting.verify``, ``jaxnets.attention``) call it before their
first compilation, with their ``--compile-cache`` flag: a directory, or ``off``; by
default ``$JAXNETS_COMPILE_CACHE``, else ``xla`` in jaxnets' cache folder
(``$JAXNETS_CACHE``, ``$XDG_CACHE_HOME/jaxnets`` or ``~/.cache/jaxnets``, as for
converted weights).
A cache directory already given to jax (``JAX_COMPILATION_CACHE_DIR``) is kept as it
is, with jax's settings. In the one chosen here, every program is written, however
short its compile (jax's default skips those under a second, which is each of the
initialisers above, 0.3 s apiece, and most steps of small models), and the directory
is held under :data:`MAX_BYTES` by jax's least-recently-used eviction.

jax keys each entry by the program, the jax/jaxlib versions, the XLA flags and the
devices, so a changed program or install is compiled afresh. As jax warns, a cache
directory is trusted: whoever can write to it can make the programs run code, so do
not point it at a directory others can write. In a multi-process run only process 0
writes entries (jax's rule); the other processes read what they find in theirs, so a
directory on a file system every host mounts gives every host the hits.

An entry jax cannot read (truncated: a process killed while writing it, a full disk)
costs a warning naming the program and a fresh compile, with the same results; jax
never replaces an entry it finds, so the warning comes back each run until the
directory is deleted.
"""

from __future__ import annotations

import os
import threading

ENV_VAR = "JAXNETS_COMPILE_CACHE"
OFF = "off"
# jax evicts the least recently used entries above this size (with ``filelock``
# installed; torch brings it). On CPU a ResNet-50 train step's entry is 0.4 MB and a
# short ResNet-18 fine-tuning run's 1.1 MB in all.
MAX_BYTES = 2 << 30

_lock = threading.Lock()
_counts = {"lookups": 0, "hits": 0}
_listening = False
_enabled_dir: str | None = None
_at_enable = dict(_counts)


class CompileCacheError(ValueError):
    """A compilation cache directory that cannot be used."""


FLAG_HELP = ("keep compiled XLA programs in DIR and read them back on later runs "
             "(jaxnets/compile_cache.py); 'off' compiles afresh (auto: $JAXNETS_COMPILE_CACHE, "
             "else xla/ in $JAXNETS_CACHE, $XDG_CACHE_HOME/jaxnets or ~/.cache/jaxnets; a "
             "JAX_COMPILATION_CACHE_DIR "
             "already set is used as it is)")


def add_flag(parser) -> None:
    """Adds the programs' ``--compile-cache DIR|off`` option to an argparse parser or group."""
    parser.add_argument("--compile-cache", default=None, metavar="DIR|off", help=FLAG_HELP)


def cache_root() -> str:
    """jaxnets' cache folder, for the compiled programs here and the converted weights
    (``porting.pretrained``): ``$JAXNETS_CACHE``, else ``$XDG_CACHE_HOME/jaxnets``, else
    ``~/.cache/jaxnets``."""
    base = os.environ.get("JAXNETS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "jaxnets")
    return os.path.expanduser(base)


def default_dir() -> str:
    """``xla`` in :func:`cache_root`."""
    return os.path.join(cache_root(), "xla")


def resolve(setting: str | None = None) -> str | None:
    """The cache directory a program's ``--compile-cache`` setting names.

    Args:
      setting: a directory, ``"off"``, or None for ``$JAXNETS_COMPILE_CACHE`` (a
        directory or ``off``), else :func:`default_dir`.

    Returns:
      The directory (``~`` expanded), or None for off.
    """
    if setting is None:
        setting = os.environ.get(ENV_VAR) or default_dir()
    setting = setting.strip()
    if setting.lower() == OFF:
        return None
    if not setting:
        raise CompileCacheError("the compilation cache directory is empty (give a path or "
                                f"'{OFF}')")
    return os.path.expanduser(setting)


def _listen() -> None:
    """Counts the cache's lookups and hits (``jax.monitoring`` events)."""
    global _listening
    import jax

    with _lock:
        if _listening:
            return
        _listening = True

    def on_event(event: str, **kwargs) -> None:
        key = {"/jax/compilation_cache/compile_requests_use_cache": "lookups",
               "/jax/compilation_cache/cache_hits": "hits"}.get(event)
        if key:
            with _lock:
                _counts[key] += 1

    jax.monitoring.register_event_listener(on_event)


def enable(setting: str | None = None) -> str | None:
    """Turns on jax's persistent compilation cache; call before the first compilation.

    With ``setting`` None, a directory already set for jax (``jax_compilation_cache_dir``,
    e.g. from ``JAX_COMPILATION_CACHE_DIR``) is kept, with jax's settings as they are;
    a ``setting`` given replaces it (``"off"`` turns jax's cache off). In a directory
    this chooses, every program is written and the size is held under
    :data:`MAX_BYTES`, unless jax's environment variables for the minimum compile time
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``) or the size
    (``JAX_COMPILATION_CACHE_MAX_SIZE``) say otherwise.

    Args:
      setting: as for :func:`resolve`.

    Returns:
      The directory in use, or None when off.

    Raises:
      CompileCacheError: a directory that cannot be created or written, when it was
        asked for (``setting`` or ``$JAXNETS_COMPILE_CACHE``); the default directory
        is skipped with a warning instead, since a run does not need it.
    """
    global _enabled_dir, _at_enable
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    if setting is None and current:
        # jax's cache as its user set it up, limits included: eviction switched on in
        # one of several processes sharing a folder fails on the entries the others
        # wrote (no access-time files; seen with the test suite's shared folder).
        path = current
    else:
        asked = setting is not None or bool(os.environ.get(ENV_VAR))
        path = resolve(setting)
        if path is None:
            if current:  # "off" given while jax has a directory
                jax.config.update("jax_enable_compilation_cache", False)
                compilation_cache.reset_cache()
            _enabled_dir = None
            return None
        if "://" not in path:  # a local directory: check it now, not at jax's first use
            try:
                os.makedirs(path, exist_ok=True)
                if not os.access(path, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied")
            except OSError as e:
                reason = e.strerror or str(e)
                if asked:
                    raise CompileCacheError(f"compilation cache {path}: {reason} (give another "
                                            f"directory, or '{OFF}')") from None
                import warnings

                warnings.warn(f"no compilation cache ({path}: {reason}); programs are "
                              "compiled afresh each run", stacklevel=2)
                _enabled_dir = None
                return None
        if not jax.config.jax_enable_compilation_cache:  # an earlier "off" here
            jax.config.update("jax_enable_compilation_cache", True)
            compilation_cache.reset_cache()
        if path != current:
            jax.config.update("jax_compilation_cache_dir", path)
            # jax decides at its first compilation whether and where to cache; an
            # earlier compilation in this process would keep the old answer.
            compilation_cache.reset_cache()
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
            import importlib.util

            if importlib.util.find_spec("filelock") is not None:  # jax needs it to evict
                jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    _listen()
    _enabled_dir, _at_enable = path, stats(since_enable=False)
    return path


def stats(since_enable: bool = True) -> dict[str, int]:
    """Programs looked up in the cache and read back from it: since the last
    :func:`enable`, or in this whole process."""
    with _lock:
        counts = dict(_counts)
    if since_enable:
        counts = {k: v - _at_enable[k] for k, v in counts.items()}
    return counts


def summary() -> str | None:
    """One line for a program's log: the directory and the programs read back; None
    when :func:`enable` did not turn the cache on."""
    if _enabled_dir is None:
        return None
    s = stats()
    return f"compilation cache {_enabled_dir}: {s['hits']} of {s['lookups']} programs read back"
