"""Image classification data: sources chosen by a spec string, and a batch loader.

Dataset specs (``--dataset``):

* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images,
  10 classes, offline). uint8 8x8x1 images (0..16 scaled to 0..255); a
  stratified split seeded by ``seed`` holds out 20% as "val".
* ``tfds:NAME[:TRAIN_SPLIT[:VAL_SPLIT]]`` -- a TensorFlow Datasets dataset read
  with ``tfds.data_source`` (random access over ArrayRecord files; needs no
  TensorFlow, but the dataset must already be prepared in ``data_dir`` in the
  array_record format, as nothing is downloaded). NAME may carry a config and
  a version (``imagenet2012``, ``cifar10:3.0.2``, ``mnist/config:1.*.*``).
  Split specs use TFDS's syntax, e.g. ``tfds:cifar10:train[:90%]:train[90%:]``
  or ``tfds:cifar10:train:test``. Defaults: train = ``train``; val =
  ``validation`` if the dataset has it, else a held-out tail of train
  (``train[:90%]`` / ``train[90%:]`` for ``val_fraction=0.1``), so the test
  split stays untouched unless named. Images and labels are the ``image`` and
  ``label`` features, else the first image and ClassLabel ones, unless
  ``load_dataset``'s ``image_feature`` / ``label_feature`` name others.
* ``folder:PATH`` or a bare PATH -- an image folder: one subfolder per class
  with image files (ImageFolder's extensions, nested folders included), class
  index = position of the folder name in sorted order (as torchvision's
  ``ImageFolder``). If PATH has both ``train/`` and ``val/`` subfolders those
  are the splits (one without the other is an error); otherwise every
  class is split by a seeded stratified shuffle holding out ``val_fraction``
  (default 10%) of its files.

Host transforms: batches need one image shape, so sources whose images vary in
size (folders, TFDS features of unknown shape) shape each image on the host
(``HostTransform``). Training images are stored whole: resized so the longer
side fills a square (4/3 of the largest of 256, the eval resize and the crop,
so a 4:3 image keeps a shorter side at least that large), in its top-left
corner, with the image's (height, width) as the batch's ``extent``; the
on-device ``RandomResizedCrop`` draws its boxes from that extent, as
torchvision's draws them from the whole image (``load_dataset``'s
``storage_size`` alone gives the central square of that side instead).
Evaluation images get torchvision's eval transform on the host, on the PIL
image as ``ImageFolder`` + ``weights.transforms()`` do (``Resize`` of the
shorter side with the weights' interpolation, then ``CenterCrop``), so the
model sees exactly the pixels a torchvision evaluation would; the device then
only normalises (``AugmentConfig.eval_prepared``). Fixed-shape datasets
(digits, cifar10, mnist) keep their native size; the on-device augmentation
(``train.augment``) does every resize.

Why a small threaded loader rather than grain: the loader must (a) shuffle
epoch ``e`` with ``seed + e`` exactly, (b) hand process ``p`` the ``p``-th
slice of *every global batch* (what ``jax.make_array_from_process_local_data``
assembles), (c) resume from a global step, and (d) pad the final partial batch
with a mask so eval shapes stay static. grain's ``DataLoader`` shards the
record index (not each global batch) and derives its own per-epoch seeds;
matching (a)-(d) would mean re-implementing the index logic on top of it
anyway. The index logic here is ~30 lines of numpy, and image decoding (PIL
releases the GIL) runs in a thread pool, one batch ahead in a bounded queue.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import queue
import re
import tempfile
import threading
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from train.quiet import absl_errors_only

log = logging.getLogger(__name__)

# torchvision's ImageFolder's list (``torchvision.datasets.folder.IMG_EXTENSIONS``).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_STORAGE_SIZE = 256
_SPLITS = ("train", "val")


class DataError(ValueError):
    """A dataset cannot be found, parsed or read; the message names the culprit."""


class Source(Protocol):
    """Random-access labelled images of one split."""

    name: str
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """Returns (uint8 HxWxC image, integer label)."""
        ...


# --------------------------------------------------------------------------
# Sources.


class ArraySource:
    """Images held in memory as one uint8 NHWC array.

    Args:
        name: Dataset name for messages.
        images: uint8 ``[N, H, W, C]``.
        labels: int ``[N]``.
        class_names: Name of each class index.
    """

    def __init__(
        self, name: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
    ):
        self.name = name
        self.images = np.asarray(images, np.uint8)
        self.labels = np.asarray(labels, np.int32)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised read of several examples (the loader's fast path)."""
        return self.images[indices], self.labels[indices]


_PIL_FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}


@dataclasses.dataclass(frozen=True)
class HostTransform:
    """How a variable-size image is shaped on the host (see the module doc).

    Attributes:
        kind: ``"fit"``: the whole image resized so its longer side is
            ``size``, in the top-left corner of a ``size`` x ``size`` array of
            zeros, its (height, width) kept as the example's extent (training
            storage: the random crop samples the whole image, as torchvision's);
            ``"square"``: the shorter side resized to ``size``, then the
            central square; ``"eval"``: torchvision's
            ``Resize(resize_size)`` of the shorter side, then
            ``CenterCrop(size)`` (zero-padded where the image is smaller), as
            torchvision's PIL path does it: the model's evaluation input.
        size: Side of the output square.
        resize_size: Shorter side before the center crop (``"eval"`` only).
        interpolation: "bilinear" or "bicubic" (PIL's filters, antialiased
            as torchvision's PIL resize always is).
    """

    kind: str = "square"
    size: int = DEFAULT_STORAGE_SIZE
    resize_size: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.kind not in ("fit", "square", "eval"):
            raise ValueError(f"kind must be 'fit', 'square' or 'eval', got {self.kind!r}")
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {tuple(_PIL_FILTERS)}, "
                             f"got {self.interpolation!r}")
        if self.size < 1 or (self.kind == "eval" and not (self.resize_size or 0) >= 1):
            raise ValueError(f"bad sizes in {self}")

    def __call__(self, image: Any) -> np.ndarray:
        """Shapes one PIL image (any mode: ``jaxnets.imageio.to_rgb``).

        Returns:
            uint8 ``[size, size, 3]``.
        """
        return self.apply(image)[0]

    def apply(self, image: Any) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Shapes one PIL image; returns the uint8 ``[size, size, 3]`` array and,
        for ``"fit"``, the (height, width) the image takes in it (else None)."""
        from PIL import Image

        from jaxnets.imageio import to_rgb

        image = to_rgb(image)
        resample = getattr(Image.Resampling, _PIL_FILTERS[self.interpolation])
        width, height = image.size
        if self.kind == "fit":
            scale = self.size / max(width, height)
            new_w = min(self.size, max(1, round(width * scale)))
            new_h = min(self.size, max(1, round(height * scale)))
            canvas = np.zeros((self.size, self.size, 3), np.uint8)
            canvas[:new_h, :new_w] = np.asarray(image.resize((new_w, new_h), resample), np.uint8)
            return canvas, (new_h, new_w)
        if self.kind == "square":
            side = min(width, height)
            left, top = (width - side) / 2.0, (height - side) / 2.0
            # One PIL resize with a source box does crop + antialiased resize at once.
            box = (left, top, left + side, top + side)
            pixels = image.resize((self.size, self.size), resample, box=box)
            return np.asarray(pixels, np.uint8), None
        from train.augment import center_crop_box, resized_shape

        new_h, new_w = resized_shape(height, width, self.resize_size)
        # torchvision leaves an image already at its size as it is; so does PIL.
        pixels = np.asarray(image.resize((new_w, new_h), resample), np.uint8)
        crop = self.size
        pad_h, pad_w = max(crop - new_h, 0), max(crop - new_w, 0)
        if pad_h or pad_w:  # torchvision's CenterCrop pads with zeros first
            pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2),
                                     (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        top, left = center_crop_box(pixels.shape[0], pixels.shape[1], crop, crop)
        return np.ascontiguousarray(pixels[top : top + crop, left : left + crop]), None


def train_storage(crop_size: int, resize_size: int, interpolation: str) -> HostTransform:
    """The training storage of variable-size images for a model fed ``crop_size``
    pixels: the whole image (``"fit"``) in a square 4/3 the largest of 256, the
    eval resize and the crop, so an image up to 4:3 keeps a shorter side at least
    that large and the random crops are not upsampled from a smaller store."""
    size = math.ceil(max(DEFAULT_STORAGE_SIZE, crop_size, resize_size) * 4 / 3)
    return HostTransform("fit", size, interpolation=interpolation)


def decode_image(path: str, size: int | HostTransform) -> np.ndarray:
    """Decodes an image file to uint8 ``[size, size, 3]`` (``decode_image_extent``
    also gives a ``"fit"`` transform's extent).

    Args:
        path: Image file.
        size: A ``HostTransform``, or the side of a ``"square"`` one (the
            shorter side resized to it, the central square kept).

    Returns:
        The decoded, shaped image.

    Raises:
        DataError: The file cannot be read or decoded; the message names it.
    """
    return decode_image_extent(path, size)[0]


def decode_image_extent(path: str, size: int | HostTransform
                        ) -> tuple[np.ndarray, tuple[int, int] | None]:
    """``decode_image`` and the extent ``HostTransform.apply`` gives (None unless
    ``"fit"``)."""
    from PIL import Image

    transform = size if isinstance(size, HostTransform) else HostTransform("square", size)
    try:
        with Image.open(path) as image:
            if transform.kind != "eval":
                # JPEG can decode directly at a reduced scale that is still >= size.
                # Not for evaluation: torchvision decodes the whole image.
                image.draft("RGB", (transform.size, transform.size))
            return transform.apply(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e


class FolderSource:
    """Image files with labels, decoded on access.

    Args:
        name: Dataset name for messages.
        files: Image paths.
        labels: Class index of each file.
        class_names: Name of each class index.
        storage_size: Side of the stored square images (see module doc).
            ``host_transform``, settable, replaces it (a ``HostTransform``).
        skip_bad: If True an undecodable file is logged, counted in
            ``bad_files`` and replaced by the next readable file (in index
            order, wrapping), so every read stays deterministic and batches
            keep their size; if False it raises ``DataError``.
        substitute: With ``skip_bad``, False leaves an undecodable file out
            instead: ``read`` gives a blank image with label -1, which the
            ``Loader`` masks (an evaluation counts no image twice).
    """

    def __init__(
        self,
        name: str,
        files: Sequence[str],
        labels: Sequence[int],
        class_names: Sequence[str],
        storage_size: int = DEFAULT_STORAGE_SIZE,
        skip_bad: bool = False,
        substitute: bool = True,
    ):
        self.name = name
        self.substitute = substitute
        self.files = list(files)
        self.labels = np.asarray(labels, np.int32)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.host_transform = HostTransform("square", storage_size)
        self.skip_bad = skip_bad
        self.bad_files: set[str] = set()
        self._lock = threading.Lock()

    @property
    def num_bad(self) -> int:
        """How many distinct undecodable files were skipped so far."""
        return len(self.bad_files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.read(index)[:2]

    def read(self, index: int) -> tuple[np.ndarray, int, tuple[int, int] | None]:
        """(image, label, extent): the extent of a ``"fit"`` host transform, else None."""
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image, extent = decode_image_extent(self.files[i], self.host_transform)
                return image, int(self.labels[i]), extent
            except DataError as e:
                if not self.skip_bad:
                    raise
                with self._lock:
                    if self.files[i] not in self.bad_files:
                        self.bad_files.add(self.files[i])
                        log.warning("skipping %s (%d bad so far)", e, len(self.bad_files))
                if not self.substitute:
                    size = self.host_transform.size
                    extent = (size, size) if self.host_transform.kind == "fit" else None
                    return np.zeros((size, size, 3), np.uint8), -1, extent
        raise DataError(f"no readable image among the {len(self.files)} files of {self.name}")


class TfdsSource:
    """A split of a TFDS dataset read through ``tfds.data_source``.

    Images that are not uint8 are scaled to 8 bits as image files are
    (``jaxnets.imageio.to_uint8``); 2 channels (gray + alpha) keep the first,
    4 (RGBA) the first three.

    Args:
        name: Dataset name for messages.
        data_source: What ``tfds.data_source`` returned for one split.
        image_key: Feature holding the image.
        label_key: Feature holding the ClassLabel.
        class_names: Name of each class index.
        auto_keys: (image, label) features chosen when none are named; None: these.
        storage_size: If not None, images are resized on the host (variable
            image shapes; a ``"square"`` ``HostTransform`` of that side, which
            ``host_transform`` replaces); None keeps them as stored.
    """

    def __init__(self, name, data_source, image_key, label_key, class_names, storage_size=None,
                 auto_keys=None):
        self.name = name
        self.data_source = data_source
        self.image_key = image_key
        self.label_key = label_key
        # The features chosen when none are named (a run's config.json from before
        # --image-feature / --label-feature means these).
        self.auto_keys = (image_key, label_key) if auto_keys is None else tuple(auto_keys)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.host_transform = None if storage_size is None else HostTransform("square",
                                                                              storage_size)

    @property
    def storage_size(self) -> int | None:
        """Side of the host-shaped images; None for fixed-size ones (kept as stored)."""
        return None if self.host_transform is None else self.host_transform.size

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.read(index)[:2]

    def read(self, index: int) -> tuple[np.ndarray, int, tuple[int, int] | None]:
        """(image, label, extent): the extent of a ``"fit"`` host transform, else None."""
        from jaxnets.imageio import to_uint8

        try:
            example = self.data_source[int(index)]
            image, label = np.asarray(example[self.image_key]), int(example[self.label_key])
        except Exception as e:  # noqa: BLE001 -- ArrayRecord/tfds decoding raise many kinds
            raise DataError(f"{self.name}: cannot read example {index}: "
                            f"{type(e).__name__}: {e}") from e
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in _CHANNELS:
            raise DataError(f"{self.name}: example {index} has an image of shape {image.shape}; "
                            "images need 1 to 4 channels (gray, gray + alpha, RGB, RGBA)")
        image = to_uint8(image[:, :, : _CHANNELS[image.shape[2]]])
        if self.host_transform is None:
            return image, label, None
        from PIL import Image

        pixels, extent = self.host_transform.apply(
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image))
        return pixels, label, extent


# Channels kept of an image with 1, 2 (gray + alpha), 3 or 4 (RGBA) channels.
_CHANNELS = {1: 1, 2: 1, 3: 3, 4: 3}


def split_fingerprint(train: Source, val: Source) -> dict[str, Any]:
    """What identifies a dataset's split for a run: both sizes and a digest of the
    validation examples (an image folder's files relative to their common folder,
    else the source's name), so a resume can tell that files were added or moved
    between the splits."""
    import hashlib

    files = getattr(val, "files", None)
    if files:
        root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        names = sorted(os.path.relpath(f, root) for f in files)
    else:
        names = [getattr(val, "name", "")]
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return {"train": len(train), "val": len(val), "val_digest": digest}


def set_host_transforms(
    train: Source, val: Source, *, crop_size: int, resize_size: int, interpolation: str,
    extra: Sequence[Source] = (),
) -> bool:
    """Sets how sources of variable-size images shape them on the host for a model
    fed ``crop_size`` pixels: ``train`` and ``extra`` (a target domain) get
    ``train_storage`` (whole images with their extents), ``val`` torchvision's
    eval transform (``HostTransform("eval", ...)``). Sources of fixed-size images
    are left as they are.

    Returns:
        Whether ``val``'s images now arrive resized and center-cropped (the eval
        transform must then only normalise: ``AugmentConfig.eval_prepared``).
    """
    storage = train_storage(crop_size, resize_size, interpolation)
    for source in (train, *extra):
        if getattr(source, "host_transform", None) is not None:
            source.host_transform = storage
    if getattr(val, "host_transform", None) is None:
        return False
    val.host_transform = HostTransform("eval", crop_size, resize_size, interpolation)
    return True


# --------------------------------------------------------------------------
# Specs.


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``--dataset`` string.

    Attributes:
        kind: "digits", "tfds" or "folder".
        name: TFDS name (with config/version) or the folder path.
        train_split: TFDS train split spec, None for the default.
        val_split: TFDS val split spec, None for the default.
    """

    kind: str
    name: str = ""
    train_split: str | None = None
    val_split: str | None = None


_VERSION = re.compile(r"^\d+(\.(\d+|\*)){0,2}$")


def _split_outside_brackets(text: str) -> list[str]:
    """Splits on ':' that are not inside [...] (split slices contain colons)."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == ":" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_spec(spec: str) -> DatasetSpec:
    """Parses a dataset spec string (syntax in the module docstring).

    Args:
        spec: e.g. "digits", "tfds:cifar10:train[:90%]:train[90%:]",
            "folder:/data/pets" or "/data/pets".

    Returns:
        The parsed spec.

    Raises:
        DataError: The spec matches none of the forms.
    """
    if spec == "digits":
        return DatasetSpec("digits", "digits")
    if spec.startswith("tfds:"):
        parts = _split_outside_brackets(spec[len("tfds:") :])
        name = parts.pop(0)
        if parts and _VERSION.match(parts[0]):
            name += ":" + parts.pop(0)
        if not name or len(parts) > 2 or any(not p for p in parts):
            raise DataError(
                f"bad tfds spec {spec!r}: expected tfds:NAME[:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]"
            )
        parts += [None] * (2 - len(parts))
        return DatasetSpec("tfds", name, parts[0], parts[1])
    if spec.startswith("folder:"):
        if not spec[len("folder:") :].strip():
            raise DataError("dataset spec 'folder:' names no folder: give folder:PATH")
        return DatasetSpec("folder", spec[len("folder:") :])
    if os.sep in spec or spec.startswith((".", "~")) or os.path.isdir(spec):
        return DatasetSpec("folder", spec)
    raise DataError(
        f"unknown dataset spec {spec!r}: expected 'digits', 'tfds:NAME[:TRAIN_SPLIT[:VAL_SPLIT]]', "
        "'folder:PATH' or a directory path"
    )


def default_val_fraction(spec: str) -> float:
    """The held-out fraction where a dataset has no validation split of its own:
    0.2 for ``digits`` (as the Quickstart's figures), else 0.1."""
    return 0.2 if spec == "digits" else 0.1


def load_dataset(
    spec: str,
    *,
    split: str,
    data_dir: str | None = None,
    seed: int = 0,
    val_fraction: float | None = None,
    storage_size: int = DEFAULT_STORAGE_SIZE,
    skip_bad: bool = False,
    image_feature: str | None = None,
    label_feature: str | None = None,
) -> Source:
    """Opens one split of the dataset named by ``spec``.

    Args:
        spec: Dataset spec (see the module docstring).
        split: "train" or "val".
        data_dir: TFDS data directory (TFDS's default when None); unused by
            the other kinds.
        seed: Seed of the train/val split for sources that carve one out
            (digits, flat folders). The same seed gives the same split.
        val_fraction: Held-out fraction where a split is carved; None means
            0.2 for digits and 0.1 otherwise.
        storage_size: Host-side image size for variable-size images.
        skip_bad: For folders: log and count undecodable files instead of
            raising ``DataError``; the train split reads the next readable file
            in their place, the val split leaves them out (see ``FolderSource``).
        image_feature, label_feature: For TFDS: the features holding the image
            and the ClassLabel (None: ``image``/``label`` where the dataset has
            them, else the first of each kind); an error for the other kinds.

    Returns:
        A ``Source``.

    Raises:
        DataError: Unknown spec, missing directory, empty class folder, TFDS
            dataset unknown or not prepared, bad split; one line naming it.
    """
    if split not in _SPLITS:
        raise DataError(f"split must be one of {_SPLITS}, got {split!r}")
    parsed = parse_spec(spec)
    fraction = default_val_fraction(spec) if val_fraction is None else val_fraction
    if parsed.kind != "tfds" and (image_feature or label_feature):
        flag = "--image-feature" if image_feature else "--label-feature"
        raise DataError(f"{flag} is for tfds datasets; {spec!r} is not one")
    if parsed.kind == "digits":
        return _load_digits(split, seed, fraction)
    if parsed.kind == "folder":
        return _load_folder(parsed.name, split, seed, fraction, storage_size, skip_bad)
    return _load_tfds(parsed, split, data_dir, fraction, storage_size,
                      (image_feature, label_feature))


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of example indices.

    Each class with at least two examples gives ``round(count * val_fraction)``
    examples (at least 1, at most count - 1) to val.

    Args:
        labels: int ``[N]``.
        val_fraction: Fraction held out per class.
        seed: Shuffle seed.

    Returns:
        (train_indices, val_indices), each sorted.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        n_val = 0 if n < 2 else min(max(round(n * val_fraction), 1), n - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _load_digits(split: str, seed: int, val_fraction: float) -> ArraySource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    train, val = stratified_split(digits.target, val_fraction, seed)
    idx = train if split == "train" else val
    return ArraySource("digits", images[idx], digits.target[idx], [str(i) for i in range(10)])


def _list_images(folder: str) -> list[str]:
    """A class folder's images, its subfolders' included, in ImageFolder's order
    (folders in sorted order, each one's files sorted); hidden files and folders
    are left out (ImageFolder would read ``._x.jpg`` and ``.ipynb_checkpoints``)."""
    folders = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # not walked into
        folders.append((parent, files))
    found = []
    for parent, files in sorted(folders):  # ImageFolder: sorted(os.walk(...))
        found += [os.path.join(parent, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def _class_folders(root: str) -> list[str]:
    entries = (d for d in os.listdir(root) if not d.startswith("."))
    return sorted(d for d in entries if os.path.isdir(os.path.join(root, d)))


def _scan_folder(
    root: str, class_names: list[str] | None = None
) -> tuple[list[str], list[int], list[str]]:
    """Lists (files, labels, class_names) of an ImageFolder-layout directory."""
    classes = _class_folders(root)
    if not classes:
        raise DataError(f"image folder {root} has no class subfolders")
    if class_names is not None:
        extra = sorted(set(classes) - set(class_names))
        if extra:
            raise DataError(f"image folder {root} has classes not in train: {', '.join(extra)}")
    names = class_names if class_names is not None else classes
    files, labels = [], []
    for c in classes:
        found = _list_images(os.path.join(root, c))
        if not found:
            kinds = "/".join(IMAGE_EXTENSIONS)
            raise DataError(f"class folder {os.path.join(root, c)} has no {kinds} images")
        files += found
        labels += [names.index(c)] * len(found)
    return files, labels, names


def _load_folder(path, split, seed, val_fraction, storage_size, skip_bad) -> FolderSource:
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist or is not a directory")
    name = os.path.basename(os.path.normpath(root))
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) != os.path.isdir(val_dir):
        have, lack = ("train", "val") if os.path.isdir(train_dir) else ("val", "train")
        raise DataError(f"image folder {root} has a {have}/ folder but no {lack}/: give both, "
                        f"or put the class folders directly in {root}")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        _, _, class_names = _scan_folder(train_dir)
        files, labels, _ = _scan_folder(train_dir if split == "train" else val_dir, class_names)
    else:
        files, labels, class_names = _scan_folder(root)
        train, val = stratified_split(np.asarray(labels), val_fraction, seed)
        keep = train if split == "train" else val
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    # Training keeps its batches full with the next readable file; an evaluation
    # leaves a bad file out.
    return FolderSource(f"{name}/{split}", files, labels, class_names, storage_size, skip_bad,
                        substitute=split == "train")


def _tfds_error(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else type(e).__name__
    # tfds ends some first lines with the header of a list that follows.
    return first.removesuffix(" Possible root causes:").rstrip()


@contextlib.contextmanager
def _tfds_scratch():
    """Run tfds calls with ``tempfile.tempdir`` in a folder of our own, removed after.

    For a dataset with no ``dataset_info.json`` in its data_dir (not prepared, or
    mocked), tfds 4.9's ``DatasetInfo.initialize_from_bucket`` makes a
    ``tempfile.mkdtemp("tfds")`` folder for metadata from GCS and never removes it:
    one ``/tmp/tmp*tfds`` per builder, and ``tfds.data_source`` makes a builder too.
    The process's temporary directory is ours for the length of the call: a
    thread making temporary files meanwhile would make them in the scratch folder.
    """
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="jaxnets-tfds-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = saved


def _load_tfds(parsed: DatasetSpec, split, data_dir, val_fraction, storage_size,
               features) -> TfdsSource:
    # tfds warns about what the error line then says (no dataset_info.json: not prepared).
    with absl_errors_only():
        return _open_tfds(parsed, split, data_dir, val_fraction, storage_size, features)


def _open_tfds(parsed: DatasetSpec, split, data_dir, val_fraction, storage_size,
               features) -> TfdsSource:
    import tensorflow_datasets as tfds

    try:
        with _tfds_scratch():
            builder = tfds.builder(parsed.name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; all mean "no such dataset".
        raise DataError(f"unknown tfds dataset {parsed.name!r}: {_tfds_error(e)}") from e
    info = builder.info
    image_key, label_key = _tfds_keys(parsed.name, info.features, *features)
    auto_keys = _tfds_keys(parsed.name, info.features)
    has_val = "validation" in info.splits
    pct = round(100 * val_fraction)
    train_split = parsed.train_split or ("train" if has_val else f"train[:{100 - pct}%]")
    val_split = parsed.val_split or ("validation" if has_val else f"train[{100 - pct}%:]")
    split_spec = train_split if split == "train" else val_split
    try:
        with _tfds_scratch():
            source = tfds.data_source(parsed.name, split=split_spec, data_dir=data_dir,
                                      download=False)
    except Exception as e:  # noqa: BLE001 -- map tfds's assorted errors to one line.
        where = data_dir or "TFDS's default data_dir"
        if builder.is_prepared():
            message = f"tfds dataset {parsed.name!r} cannot read split {split_spec!r} in {where}"
        else:
            message = (
                f"tfds dataset {parsed.name!r} is not prepared in {where} "
                f"(run `tfds build {parsed.name} --file_format=array_record`)"
            )
        raise DataError(f"{message}: {_tfds_error(e)}") from e
    label = info.features[label_key]
    shape = info.features[image_key].shape
    if len(shape) == 3 and shape[2] is not None and shape[2] not in _CHANNELS:
        raise DataError(f"tfds dataset {parsed.name!r}: feature {image_key!r} has {shape[2]} "
                        "channels; images need 1 to 4 (gray, gray + alpha, RGB, RGBA)")
    fixed = len(shape) == 3 and None not in shape
    return TfdsSource(
        f"{parsed.name}/{split_spec}",
        source,
        image_key,
        label_key,
        label.names,
        storage_size=None if fixed else storage_size,
        auto_keys=auto_keys,
    )


def _tfds_keys(name: str, features, image_key: str | None = None,
               label_key: str | None = None) -> tuple[str, str]:
    """The image and ClassLabel features: those given, else 'image'/'label' where the
    dataset has them, else the first of each kind."""
    import tensorflow_datasets as tfds

    keys = list(features.keys())
    labels = [k for k in keys if isinstance(features[k], tfds.features.ClassLabel)]
    pictures = [k for k in keys if isinstance(features[k], tfds.features.Image)]
    arrays = [
        k
        for k in keys
        # ClassLabel is a Tensor subclass too, hence the exclusion.
        if isinstance(features[k], tfds.features.Tensor)
        and len(features[k].shape) in (2, 3)
        and k not in labels and k not in pictures
    ]
    for given, flag, kind, fits in ((image_key, "--image-feature", "an image", pictures + arrays),
                                    (label_key, "--label-feature", "a ClassLabel", labels)):
        if given is not None and given not in fits:
            what = "not a feature of" if given not in keys else f"not {kind} feature of"
            raise DataError(f"{flag} {given}: {what} tfds dataset {name!r} ({kind.split()[1]} "
                            f"features: {', '.join(fits) or 'none'}; all: {', '.join(keys)})")
    images = pictures or arrays
    if not images or not labels:
        have = ", ".join(keys)
        raise DataError(f"tfds dataset {name!r} has no image + ClassLabel features (has {have})")
    image_key = image_key or ("image" if "image" in images else images[0])
    return image_key, label_key or ("label" if "label" in labels else labels[0])


# --------------------------------------------------------------------------
# Loader.


class Loader:
    """Seeded, resumable, process-sharded batches, prepared in a background thread.

    Step ``s`` (global, counted from the start of training) is batch
    ``s % steps_per_epoch`` of epoch ``e = s // steps_per_epoch``; epoch ``e``
    visits the examples in the order ``np.random.default_rng(seed + e)
    .permutation(n)`` (or in index order without ``shuffle``). Global batch
    ``b`` holds order positions ``[b*B, (b+1)*B)``; process ``p`` of ``P``
    gets its ``p``-th contiguous slice of ``B/P`` examples, so concatenating
    the processes' batches in process order gives the global batch. Without
    ``drop_remainder`` the last batch of each epoch is padded (zeros, label
    0, ``mask`` False, ``index`` -1) to keep shapes static.

    Each batch is a dict of numpy arrays: ``image`` uint8 ``[B/P, H, W, C]``,
    ``label`` int32, ``mask`` bool (False for padding) and ``index`` int64
    (dataset index, -1 for padding); with a ``"fit"`` host transform also
    ``extent`` int32 ``[B/P, 2]``, each image's (height, width) in its array.

    Iterating starts a thread that reads ``prefetch`` batches ahead (image
    decoding fans out to ``num_workers`` threads). An exception while reading
    is raised from ``next()`` in the consumer. Iterators should be closed
    (``close()``, ``with``, exhausting them, or garbage collection).

    Args:
        source: A ``Source``.
        batch_size: Global batch size (all processes), divisible by
            ``process_count``.
        shuffle: Shuffle each epoch.
        seed: Base seed; epoch e uses ``seed + e``.
        drop_remainder: Drop each epoch's last partial batch (training)
            rather than pad it (evaluation).
        process_index: This process (``jax.process_index()``).
        process_count: All processes (``jax.process_count()``).
        start_step: First global step to yield (resume position).
        num_epochs: Stop after this many epochs; None repeats forever.
        prefetch: Batches prepared ahead (queue bound), >= 1.
        num_workers: Threads decoding the examples of one batch.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        start_step: int = 0,
        num_epochs: int | None = None,
        prefetch: int = 2,
        num_workers: int = 4,
    ):
        if batch_size <= 0 or batch_size % process_count:
            raise DataError(
                f"batch size {batch_size} must be positive and divisible by "
                f"{process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process index {process_index} not in [0, {process_count})")
        if prefetch < 1 or num_workers < 1 or start_step < 0:
            raise DataError("prefetch and num_workers must be >= 1, start_step >= 0")
        self.source = source
        self.num_examples = len(source)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.process_count = process_count
        self.start_step = start_step
        self.num_epochs = num_epochs
        self.prefetch = prefetch
        self.num_workers = num_workers
        full, rest = divmod(self.num_examples, batch_size)
        self.steps_per_epoch = full if drop_remainder else full + (rest > 0)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{getattr(source, 'name', 'dataset')} has {self.num_examples} examples, "
                f"fewer than one batch of {batch_size}"
            )
        self._example = None

    @property
    def num_steps(self) -> int | None:
        """Total steps over ``num_epochs`` (None when repeating forever)."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    @property
    def num_bad(self) -> int:
        """Undecodable files skipped so far by the source (``skip_bad``)."""
        return getattr(self.source, "num_bad", 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of one epoch."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_examples)

    def indices(self, step: int, order: np.ndarray | None = None) -> np.ndarray:
        """Dataset indices of this process's part of global step ``step`` (-1 = padding).

        Args:
            step: Global step.
            order: ``epoch_order`` of the step's epoch, if already computed.

        Returns:
            int64 ``[local_batch_size]``.
        """
        epoch, batch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch) if order is None else order
        glob = order[batch * self.batch_size : (batch + 1) * self.batch_size]
        glob = np.concatenate([glob, np.full(self.batch_size - len(glob), -1, glob.dtype)])
        lo = self.process_index * self.local_batch_size
        return glob[lo : lo + self.local_batch_size].astype(np.int64)

    def read(
        self, indices: np.ndarray, pool: concurrent.futures.Executor | None = None
    ) -> dict[str, np.ndarray]:
        """Reads the examples at ``indices`` into a batch dict (synchronously).

        Args:
            indices: Dataset indices, -1 for padding.
            pool: Executor to decode examples in parallel; None reads serially.

        Returns:
            The batch dict (see the class docstring).
        """
        valid = indices >= 0
        real = indices[valid]
        extents = None
        if hasattr(self.source, "read_many"):
            images, labels = self.source.read_many(real)
        else:
            read = getattr(self.source, "read", None) or (lambda i: (*self.source[i], None))
            items = list((pool.map if pool else map)(read, real.tolist()))
            images = np.stack([item[0] for item in items]) if items else None
            labels = np.array([item[1] for item in items], np.int32)
            if items and items[0][2] is not None:
                extents = np.array([item[2] for item in items], np.int32)
        if self._example is None:
            self._example = images[0] if len(real) else self.source[0][0]
        out_images = np.zeros((len(indices),) + self._example.shape, np.uint8)
        out_labels = np.zeros(len(indices), np.int32)
        if len(real):
            if images.shape[1:] != self._example.shape:
                raise DataError(
                    f"{getattr(self.source, 'name', 'dataset')}: image shape "
                    f"{images.shape[1:]} differs from {self._example.shape}; "
                    "set a storage size for variable-size images"
                )
            out_images[valid] = images
            out_labels[valid] = labels
        dropped = out_labels < 0  # an undecodable file a source leaves out (label -1)
        out_labels[dropped] = 0
        batch = {"image": out_images, "label": out_labels, "mask": valid & ~dropped,
                 "index": indices}
        if extents is not None:  # "fit" storage: each image's size in its array
            batch["extent"] = np.tile(np.array(self._example.shape[:2], np.int32),
                                      (len(indices), 1))
            batch["extent"][valid] = extents
        return batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step ``step``, read synchronously."""
        return self.read(self.indices(step))

    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(self, self.start_step)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Puts unless stopped; polls so that ``close()`` never waits on a full queue."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(
    loader: Loader, start: int, end: int | None, q: queue.Queue, stop: threading.Event, pool
) -> None:
    """Thread body; holds no reference to the iterator so that it can be collected."""
    try:
        step, epoch, order = start, None, None
        while (end is None or step < end) and not stop.is_set():
            e = step // loader.steps_per_epoch
            if e != epoch:
                epoch, order = e, loader.epoch_order(e)
            if not _put(q, (step, loader.read(loader.indices(step, order), pool)), stop):
                return
            step += 1
        _put(q, _END, stop)
    except BaseException as e:  # noqa: BLE001 -- everything goes to the consumer.
        _put(q, _Failure(e), stop)


class LoaderIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator over a ``Loader``'s batches, fed by a background thread.

    Attributes:
        step: Global step of the next batch ``next()`` returns.
    """

    def __init__(self, loader: Loader, start_step: int):
        self.step = start_step
        self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            loader.num_workers, thread_name_prefix="loader-decode"
        )
        end = loader.num_steps
        self._thread = threading.Thread(
            target=_produce,
            args=(loader, start_step, end, self._queue, self._stop, self._pool),
            name="loader-prefetch",
            daemon=True,
        )
        self._closed = False
        self._thread.start()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("loader thread ended without a result") from None
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        step, batch = item
        self.step = step + 1
        return batch

    def close(self) -> None:
        """Stops the thread and its decode pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        # Drain so that a producer blocked in put() sees the stop flag promptly.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
        # The producer is gone, so at most num_workers decodes are in flight.
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoaderIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown.
            pass
