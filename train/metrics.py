"""What a run records: a JSONL metrics file, TensorBoard scalars, PNG plots.

``metrics.jsonl`` gets one JSON object per line (``{"split": "train",
"step": 120, "loss": ..., ...}``). TensorBoard event files are written by a
small writer here (tensorboard / tensorboardX are not dependencies): an event
file is a sequence of TFRecord frames (length, masked CRC-32C, payload,
masked CRC-32C) around ``Event`` protocol buffers, and a scalar needs only
five protobuf fields, encoded by hand below.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["MetricsLog", "TensorBoardWriter", "crc32c", "read_events", "confusion_matrix",
           "plot_curves", "plot_confusion"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# JSONL.


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` (and TensorBoard) in a run directory.

    Args:
        directory: The run directory.
        resume_step: On resume, records beyond this step (written by the part
            of an interrupted run that the checkpoint does not contain) are
            dropped, so the file describes one consistent history.
        tensorboard: Also write TensorBoard scalars under ``directory/tb``.
    """

    def __init__(self, directory: str, resume_step: int | None = None, tensorboard: bool = True):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in self.records() if r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self._file = open(self.path, "a")
        self.tb = (TensorBoardWriter(os.path.join(directory, "tb"), resume_step)
                   if tensorboard else None)

    def log(self, split: str, step: int, **values: float) -> None:
        """Appends one record.

        Args:
            split: "train", "val", ...
            step: Global step.
            **values: Scalars.
        """
        record = {"split": split, "step": int(step), **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            self.tb.scalars(step, {f"{split}/{k}": float(v) for k, v in values.items()})

    def records(self) -> list[dict]:
        """Every record in the file, in order."""
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut short (a full disk, a power loss): the rest is kept.
                    log.warning("%s: line %d is damaged and left out", self.path, number)
        return records

    def close(self) -> None:
        """Closes the files."""
        if not self._file.closed:
            self._file.close()
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------
# TensorBoard event files.


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord frames.

    Args:
        data: Bytes.

    Returns:
        The unsigned 32-bit checksum.
    """
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None, session_start: bool = False) -> bytes:
    # Event: 1 wall_time (double), 2 step (int64), 3 file_version, 5 summary,
    # 7 session_log (event.proto). Summary: 1 repeated Value; Value: 1 tag, 2 simple_value
    # (float).
    # SessionLog: 1 status (START = 1).
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        msg += _length_delimited(3, file_version.encode())
    if session_start:
        msg += _length_delimited(7, _field(1, 0, _varint(1)))
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode())
                              + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items())
        msg += _length_delimited(5, values)
    return msg


class TensorBoardWriter:
    """Writes scalar summaries to a TensorBoard event file.

    Args:
        directory: Log directory (created).
        resume_step: The step a resumed run goes on from: a ``SessionLog.START``
            event at the next step makes TensorBoard drop what the earlier
            files hold past it (steps a killed run logged after its checkpoint).
    """

    def __init__(self, directory: str, resume_step: int | None = None):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, name)
        self._file = open(self.path, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))
        if resume_step is not None:
            self._write(_event(time.time(), resume_step + 1, session_start=True))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes one event with several scalars.

        Args:
            step: Global step.
            values: Tag -> value.
        """
        self._write(_event(time.time(), step, scalars=values))

    def close(self) -> None:
        """Closes the file."""
        if not self._file.closed:
            self._file.close()


def read_events(path: str) -> list[bytes]:
    """Reads the TFRecord payloads of an event file, checking both CRCs.

    Args:
        path: Event file.

    Returns:
        The serialized ``Event`` records.

    Raises:
        ValueError: A frame is truncated or a checksum does not match.
    """
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated frame header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        record = data[pos + 12:pos + 12 + length]
        (rcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if crc != _masked_crc(header) or rcrc != _masked_crc(record):
            raise ValueError(f"{path}: bad checksum in frame at byte {pos}")
        out.append(record)
        pos += 16 + length
    return out


# --------------------------------------------------------------------------
# Evaluation summaries and plots.


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true class, predicted class]``.

    Args:
        labels: int ``[N]``.
        preds: int ``[N]``.
        num_classes: Classes.

    Returns:
        int64 ``[num_classes, num_classes]``.
    """
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def plot_curves(records: Iterable[Mapping], path: str) -> None:
    """Loss and accuracy against step, train and val, as a PNG.

    Args:
        records: Metric records (``MetricsLog.records()``).
        path: PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in records if r.get("split") == split]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r.get("loss", np.nan) for r in rows], style, label=split)
        ax_acc.plot(steps, [100 * r.get("top1", np.nan) for r in rows], style, label=split)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: str) -> None:
    """The confusion matrix as a PNG (counts annotated for up to 30 classes).

    Args:
        cm: ``[true, predicted]`` counts.
        class_names: Names of the classes.
        path: PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cm.shape[0]
    side = min(max(4.0, 0.45 * n + 2), 20.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    if n <= 30:
        ticks = range(n)
        ax.set_xticks(ticks, [str(c) for c in class_names], rotation=90)
        ax.set_yticks(ticks, [str(c) for c in class_names])
        high = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > high else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (val)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
