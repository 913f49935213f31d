"""Train a small encoder-decoder ``Transformer`` on a synthetic digit-sequence task.

    python -m train.seq2seq --task reverse [--steps N] [--seed S] [--out DIR] ...

Tasks map a sequence of digits (length drawn from ``[min_len, max_len]``,
padded to ``max_len``) to its ``reverse``, its ascending ``sort`` or a
``copy``. The model is ``jaxnets.Transformer`` (batch first) with token
embeddings scaled by sqrt(d_model), fixed sinusoidal positions and a linear
output projection. Training uses teacher forcing (decoder input: BOS + target;
labels: target + EOS) with a causal target mask and source padding masks;
evaluation decodes greedily and reports exact-sequence accuracy: a sequence
counts only if every token and the EOS after it are right.

Held-out sequences: a fixed hash of each (sequence, length) puts about 10% of
all sequences in a held-out set that training never samples; the evaluation
set is drawn from it only, so the reported accuracy is on sequences the model
has not seen.

At the end the parameters are saved with Orbax under ``OUT/checkpoint`` and
the resolved configuration next to them in ``OUT/config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnets import compile_cache
from jaxnets.layers import linear
from jaxnets.transformer import Transformer, generate_square_subsequent_mask
from train.interrupt import EXIT_INTERRUPTED, Interrupt

__all__ = ["Config", "Seq2SeqTransformer", "Result", "make_batch", "train", "load_checkpoint",
           "main"]

TASKS = ("reverse", "sort", "copy")
PAD, BOS, EOS = 10, 11, 12
VOCAB = 13
# Sequences are hashed as base-11 integers (digits and PAD); 16 positions fit in 64 bits.
MAX_SUPPORTED_LEN = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on; parsed once from the command line.

    Attributes:
      task: ``reverse``, ``sort`` or ``copy``.
      steps: optimisation steps.
      batch_size: sequences per step.
      min_len: shortest source sequence.
      max_len: longest source sequence (sources are padded to it).
      d_model: model width.
      nhead: attention heads.
      num_encoder_layers: encoder layers.
      num_decoder_layers: decoder layers.
      dim_feedforward: feed-forward hidden width.
      dropout: dropout probability in the transformer.
      lr: peak learning rate.
      warmup_steps: linear warmup steps before the cosine decay.
      weight_decay: AdamW weight decay.
      eval_size: held-out sequences decoded for the final accuracy.
      eval_every: also evaluate every this many steps (0: only at the end).
      seed: seed for the weights, the training data and the evaluation set.
      out: run directory for the checkpoint and config (empty: do not save).
      progress: show a progress bar.
      compile_cache: directory of the XLA compilation cache, ``off``, or None for
        the default (``jaxnets.compile_cache``).
    """

    task: str = "reverse"
    steps: int = 1000
    batch_size: int = 128
    min_len: int = 3
    max_len: int = 10
    d_model: int = 64
    nhead: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dim_feedforward: int = 256
    dropout: float = 0.0
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    eval_size: int = 1000
    eval_every: int = 0
    seed: int = 0
    out: str = "runs/seq2seq"
    progress: bool = True
    compile_cache: str | None = None

    def __post_init__(self):
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        for name in ("steps", "batch_size", "d_model", "nhead", "num_encoder_layers",
                     "num_decoder_layers", "dim_feedforward", "eval_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got "
                                f"{getattr(self, name)}")
        if not 2 <= self.min_len <= self.max_len <= MAX_SUPPORTED_LEN:
            problems.append(f"need 2 <= --min-len <= --max-len <= {MAX_SUPPORTED_LEN}, got "
                            f"--min-len {self.min_len}, --max-len {self.max_len}")
        if self.nhead >= 1 and self.d_model % self.nhead:
            problems.append(f"--d-model {self.d_model} is not divisible by --nhead {self.nhead}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_steps", "eval_every"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if not 0 <= self.seed < 2 ** 32:
            problems.append(f"--seed must be in [0, 2**32), got {self.seed}")
        if problems:
            raise ValueError("; ".join(problems))


def _sinusoids(length: int, d_model: int) -> np.ndarray:
    pos = np.arange(length)[:, None]
    div = np.exp(np.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = np.zeros((length, d_model), np.float32)
    pe[:, 0::2] = np.sin(pos * div)
    pe[:, 1::2] = np.cos(pos * div)[:, : d_model // 2]
    return pe


class Seq2SeqTransformer(nnx.Module):
    """Token embeddings + sinusoidal positions + ``Transformer`` + output projection."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        """Build the model.

        Args:
          config: the run configuration (model sizes).
          rngs: random generators.
        """
        d = config.d_model
        self.d_model = d
        self.src_embed = nnx.Embed(VOCAB, d, rngs=rngs)
        self.tgt_embed = nnx.Embed(VOCAB, d, rngs=rngs)
        self.transformer = Transformer(
            d_model=d, nhead=config.nhead, num_encoder_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers,
            dim_feedforward=config.dim_feedforward, dropout=config.dropout, batch_first=True,
            rngs=rngs)
        self.generator = linear(d, VOCAB, rngs=rngs)

    def _embed(self, embed, tokens):
        pe = jnp.asarray(_sinusoids(tokens.shape[1], self.d_model))
        return embed(tokens) * math.sqrt(self.d_model) + pe

    def encode(self, src: jax.Array) -> jax.Array:
        """Encode (N, S) source tokens into (N, S, d_model) memory."""
        return self.transformer.encode(self._embed(self.src_embed, src),
                                       src_key_padding_mask=src == PAD)

    def decode(self, tgt_in: jax.Array, memory: jax.Array, src: jax.Array) -> jax.Array:
        """(N, T) decoder input tokens -> (N, T, vocab) logits, causally."""
        t = tgt_in.shape[1]
        # Causality alone keeps real positions from seeing later padding, so the
        # target needs no padding mask; padded positions are left out of the loss.
        y = self.transformer.decoder(self._embed(self.tgt_embed, tgt_in), memory,
                                     tgt_mask=generate_square_subsequent_mask(t),
                                     memory_key_padding_mask=src == PAD)
        return self.generator(y)

    def __call__(self, src: jax.Array, tgt_in: jax.Array) -> jax.Array:
        """Teacher-forced logits (N, T, vocab) for (N, S) sources and (N, T) decoder inputs."""
        return self.decode(tgt_in, self.encode(src), src)


def _sequence_ids(src: np.ndarray) -> np.ndarray:
    ids = np.zeros(src.shape[0], np.uint64)
    for i in range(src.shape[1]):
        ids = ids * np.uint64(11) + src[:, i].astype(np.uint64)
    return ids


def is_held_out(src: np.ndarray) -> np.ndarray:
    """Whether each padded source sequence belongs to the held-out set (~10%).

    Args:
      src: (N, max_len) int tokens, PAD-padded.

    Returns:
      (N,) bool.
    """
    h = _sequence_ids(src) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64: a Fibonacci hash
    return (h >> np.uint64(40)) % np.uint64(10) == 0


def _targets(task: str, src: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.full_like(src, PAD)
    for i, n in enumerate(lengths):
        seq = src[i, :n]
        out[i, :n] = seq[::-1] if task == "reverse" else np.sort(seq) if task == "sort" else seq
    return out


def make_batch(rng: np.random.Generator, config: Config, size: int, *, held_out: bool
               ) -> dict[str, np.ndarray]:
    """Sample sequences from the training set or the held-out set.

    Args:
      rng: numpy generator (the stream decides the batch).
      config: task and lengths.
      size: number of sequences.
      held_out: draw only held-out sequences when True, only training ones when False.

    Returns:
      ``src`` (N, max_len), ``tgt_in`` (N, max_len + 1) = BOS + target, ``tgt_out``
      (N, max_len + 1) = target + EOS, PAD-padded int32 arrays.
    """
    chunks, have = [], 0
    for _ in range(10_000):
        lengths = rng.integers(config.min_len, config.max_len + 1, size)
        src = rng.integers(0, 10, (size, config.max_len))
        src[np.arange(config.max_len)[None, :] >= lengths[:, None]] = PAD
        keep = is_held_out(src) == held_out
        chunks.append((src[keep], lengths[keep]))
        have += int(keep.sum())
        if have >= size:
            break
    else:
        raise RuntimeError("could not draw enough sequences for the requested set")
    src = np.concatenate([c[0] for c in chunks])[:size]
    lengths = np.concatenate([c[1] for c in chunks])[:size]
    tgt = _targets(config.task, src, lengths)
    n = len(src)
    tgt_in = np.concatenate([np.full((n, 1), BOS), tgt], axis=1)
    tgt_out = np.concatenate([tgt, np.full((n, 1), PAD)], axis=1)
    tgt_out[np.arange(n), lengths] = EOS
    return {"src": src.astype(np.int32), "tgt_in": tgt_in.astype(np.int32),
            "tgt_out": tgt_out.astype(np.int32)}


def _loss(model, batch):
    logits = model(batch["src"], batch["tgt_in"])
    labels = batch["tgt_out"]
    valid = labels != PAD
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = jnp.sum(ce * valid) / jnp.sum(valid)
    acc = jnp.sum((jnp.argmax(logits, -1) == labels) * valid) / jnp.sum(valid)
    return loss, acc


def greedy_decode(model: Seq2SeqTransformer, src: jax.Array, length: int) -> jax.Array:
    """Decode greedily, one token per step, reusing the encoder memory.

    Args:
      model: the model (eval mode).
      src: (N, S) source tokens.
      length: tokens to produce.

    Returns:
      (N, length) predicted tokens.
    """
    memory = model.encode(src)
    buf = jnp.full((src.shape[0], length), PAD, jnp.int32).at[:, 0].set(BOS)
    preds = jnp.zeros((src.shape[0], length), jnp.int32)

    def step(i, carry):
        buf, preds = carry
        # Causal masking makes position i independent of the PADs after it.
        nxt = jnp.argmax(model.decode(buf, memory, src)[:, i], -1).astype(jnp.int32)
        preds = preds.at[:, i].set(nxt)
        buf = buf.at[:, i + 1].set(nxt, mode="drop")
        return buf, preds

    return jax.lax.fori_loop(0, length, step, (buf, preds))[1]


def exact_match(preds: np.ndarray, tgt_out: np.ndarray) -> np.ndarray:
    """Per sequence: every target token and the EOS after them predicted right.

    Args:
      preds: (N, T) predicted tokens.
      tgt_out: (N, T) labels (target + EOS, PAD-padded).

    Returns:
      (N,) bool.
    """
    valid = tgt_out != PAD
    return np.all((preds == tgt_out) | ~valid, axis=1)


@dataclasses.dataclass
class Result:
    """What a run achieved.

    Attributes:
      accuracy: exact-sequence accuracy on the held-out evaluation set.
      token_accuracy: last teacher-forced token accuracy on a training batch.
      loss: last training loss.
      seconds: wall time of the whole run (compilation included).
      checkpoint: path of the saved checkpoint, or None.
      history: (step, held-out accuracy) from periodic evaluations.
      stopped_at: the step a Ctrl-C stopped the run at (no final evaluation:
        ``accuracy`` is NaN), or None.
    """

    accuracy: float
    token_accuracy: float
    loss: float
    seconds: float
    checkpoint: str | None
    history: list[tuple[int, float]]
    stopped_at: int | None = None


def _make_optimizer(config: Config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr,
        # optax needs a non-empty cosine phase after the warmup.
        warmup_steps=min(config.warmup_steps, config.steps - 1),
        decay_steps=config.steps, end_value=config.lr * 0.01)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.98, weight_decay=config.weight_decay))


def build(config: Config) -> tuple[Seq2SeqTransformer, nnx.Optimizer]:
    """The model and its optimizer for a configuration.

    Args:
      config: the run configuration.

    Returns:
      ``(model, optimizer)``, model in train mode.
    """
    model = Seq2SeqTransformer(config, rngs=nnx.Rngs(params=config.seed,
                                                     dropout=config.seed + 1))
    return model, nnx.Optimizer(model, _make_optimizer(config), wrt=nnx.Param)


def train(config: Config) -> Result:
    """Train, evaluate on held-out sequences and save the checkpoint.

    Args:
      config: the run configuration.

    Returns:
      The ``Result``.
    """
    start = time.perf_counter()
    model, optimizer = build(config)
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        (loss, acc), grads = nnx.value_and_grad(_loss, has_aux=True)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, acc

    eval_graphdef, _ = nnx.split(model)
    out_len = config.max_len + 1

    @jax.jit
    def predict(params, src):
        m = nnx.merge(eval_graphdef, params)
        m.eval()
        return greedy_decode(m, src, out_len)

    eval_set = make_batch(np.random.default_rng([config.seed, 1]), config, config.eval_size,
                          held_out=True)

    def evaluate(state) -> float:
        model_state = state[0]
        preds = np.asarray(predict(model_state, eval_set["src"]))
        return float(exact_match(preds, eval_set["tgt_out"]).mean())

    with Interrupt() as interrupt:  # also over the last evaluation and the save
        state, history, loss, acc, stopped_at = _train_loop(
            config, state, train_step, evaluate, interrupt)
        accuracy = float("nan")
        if stopped_at is None:
            accuracy = evaluate(state)
            history.append((config.steps, accuracy))
        nnx.update((model, optimizer), state)
        path = save_checkpoint(model, config) if config.out else None
    return Result(accuracy, acc, loss, time.perf_counter() - start, path, history, stopped_at)


def _train_loop(config, state, train_step, evaluate, interrupt):
    """The optimisation steps; returns (state, history, loss, token accuracy, the step
    a Ctrl-C stopped at or None)."""
    from jaxnets.cli import progress_bar

    rng = np.random.default_rng([config.seed, 0])
    history = []
    loss = acc = float("nan")
    stopped_at = None
    with progress_bar(range(1, config.steps + 1), desc=f"seq2seq {config.task}",
                      disable=not config.progress) as bar:
        for step in bar:
            batch = make_batch(rng, config, config.batch_size, held_out=False)
            state, loss_d, acc_d = train_step(state, batch)
            if step % 50 == 0 or step == config.steps or interrupt.requested:
                loss, acc = float(loss_d), float(acc_d)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
            if interrupt.requested and step < config.steps:
                stopped_at = step
                break
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                history.append((step, evaluate(state)))
                bar.write(f"step {step}: held-out exact-sequence accuracy {history[-1][1]:.4f}")
    return state, history, loss, acc, stopped_at


def save_checkpoint(model: Seq2SeqTransformer, config: Config) -> str:
    """Save the parameters with Orbax and the config as JSON in ``config.out``.

    Args:
      model: the trained model.
      config: its configuration.

    Returns:
      The checkpoint directory.
    """
    import orbax.checkpoint as ocp

    out = os.path.abspath(config.out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "checkpoint")
    previous = os.path.join(out, ".previous-checkpoint")
    for stale in glob.glob(os.path.join(out, ".saving-*")):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    # The new run is written whole beside the old one, which is replaced only then
    # (renames): a save killed midway leaves the earlier run as it was.
    staging = tempfile.mkdtemp(prefix=".saving-", dir=out)
    try:
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=2)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(staging, "checkpoint"),
                       nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            ckptr.wait_until_finished()
        shutil.rmtree(previous, ignore_errors=True)
        # No Ctrl-C between the renames (a kill there leaves the old model in
        # .previous-checkpoint, which load_checkpoint falls back to).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            if os.path.exists(path):
                os.rename(path, previous)
            os.rename(os.path.join(staging, "checkpoint"), path)
            os.replace(os.path.join(staging, "config.json"), os.path.join(out, "config.json"))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_checkpoint(run_dir: str) -> tuple[Seq2SeqTransformer, Config]:
    """Rebuild a trained model from a run directory written by ``train``.

    Args:
      run_dir: the ``--out`` directory (holding ``config.json`` and ``checkpoint``).

    Returns:
      ``(model in eval mode, config)``.

    Raises:
      FileNotFoundError: when the directory holds no run.
    """
    import orbax.checkpoint as ocp

    run_dir = os.path.abspath(run_dir)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir} holds no seq2seq run (no config.json)")
    with open(cfg_path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is damaged: {e}") from None
    if not isinstance(saved, dict) or "task" not in saved:
        raise FileNotFoundError(f"{run_dir} holds no seq2seq run (its config.json is "
                                "another program's)")
    config = Config(**saved)
    model = Seq2SeqTransformer(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          nnx.to_pure_dict(params))
    path = os.path.join(run_dir, "checkpoint")
    if not os.path.exists(path) and os.path.exists(os.path.join(run_dir, ".previous-checkpoint")):
        path = os.path.join(run_dir, ".previous-checkpoint")  # a save killed between renames
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, target)
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(model, params)
    model.eval()
    return model, config


_HELP = {
    "task": "the mapping to learn: reverse, sort or copy a digit sequence",
    "steps": "optimisation steps",
    "batch_size": "sequences per step",
    "min_len": "shortest source sequence (>= 2)",
    "max_len": f"longest source sequence (<= {MAX_SUPPORTED_LEN}); sources are padded to it",
    "d_model": "model width",
    "nhead": "attention heads (must divide d-model)",
    "num_encoder_layers": "encoder layers",
    "num_decoder_layers": "decoder layers",
    "dim_feedforward": "feed-forward hidden width",
    "dropout": "dropout probability inside the transformer",
    "lr": "peak learning rate (AdamW; linear warmup, then cosine decay to 1%%)",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay",
    "eval_size": "held-out sequences decoded greedily for the final accuracy",
    "eval_every": "also report held-out accuracy every N steps (0: only at the end)",
    "seed": "seed of the weights, the training stream and the evaluation set",
    "out": "run directory for the Orbax checkpoint and config.json ('' to skip saving)",
    "progress": "show a progress bar (--no-progress hides it)",
    "compile_cache": compile_cache.FLAG_HELP,
}


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse the command line into a ``Config``.

    Args:
      argv: arguments (``sys.argv[1:]`` when None).

    Returns:
      The configuration.
    """
    from jaxnets.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m train.seq2seq", description=(
        "Train a small Transformer encoder-decoder on a synthetic digit-sequence task and "
        "report exact-sequence accuracy on held-out sequences."))
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=field.default, help=_HELP[field.name])
            continue
        kind = {"int": int, "float": float, "str": str, "str | None": str}[field.type]
        parser.add_argument(flag, type=kind, default=field.default,
                            choices=TASKS if field.name == "task" else None,
                            metavar="DIR|off" if field.name == "compile_cache" else None,
                            help=_HELP[field.name] + " (default: %(default)s)")
    ns = parser.parse_args(argv)
    try:
        return Config(**vars(ns))
    except ValueError as e:
        parser.error(str(e))


def _check_out(out: str) -> None:
    """Refuses an ``--out`` folder that holds files but no seq2seq run; an earlier
    run there is replaced, with a note."""
    from train.config import ConfigError, holds_files

    if not holds_files(out):
        return
    if not os.path.isfile(os.path.join(out, "config.json")):
        raise ConfigError(f"--out {out} holds other files and no seq2seq run (no config.json); "
                          "pass a new or empty folder")
    from train.config import load

    if "task" not in load(os.path.join(out, "config.json")):
        raise ConfigError(f"--out {out} holds another program's run (a train.finetune run?), "
                          "not a seq2seq run; pass a new or empty folder")
    print(f"note: the run in {out} is replaced at the end", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
      argv: arguments (``sys.argv[1:]`` when None).

    Returns:
      The exit status.
    """
    from jaxnets.xla_cpu import prepare_cpu

    prepare_cpu()  # before jax starts: jaxnets/hostmem.py, jaxnets/xla_cpu.py
    config = parse_args(argv)
    try:  # before the first compilation
        compile_cache.enable(config.compile_cache)
    except compile_cache.CompileCacheError as e:
        print(f"error: --compile-cache: {e}", file=sys.stderr)
        return 2
    from train.config import ConfigError, check_output_dir

    try:
        if config.out:  # before training: a bad --out is found in seconds
            check_output_dir(config.out, "--out")
            _check_out(config.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.warmup_steps >= config.steps:
        print(f"note: --warmup-steps {config.warmup_steps} is not below the run's "
              f"{config.steps} steps: the warmup is cut to {config.steps - 1}", file=sys.stderr)
    try:
        result = train(config)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training): at once
        print("interrupted: stopped at once, nothing saved (an earlier run in --out is left "
              "as it was)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.stopped_at is not None:
        saved = (f"the model so far saved in {result.checkpoint}" if result.checkpoint
                 else "nothing saved (no --out)")
        print(f"interrupted at step {result.stopped_at} of {config.steps}: {saved}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"task {config.task}: held-out exact-sequence accuracy {result.accuracy:.4f} "
          f"({config.eval_size} sequences, lengths {config.min_len}-{config.max_len}) "
          f"after {config.steps} steps in {result.seconds:.1f} s; last train loss "
          f"{result.loss:.4f}, token accuracy {result.token_accuracy:.4f}")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    if line := compile_cache.summary():
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
