"""train.data: dataset specs, sources (digits, image folders, TFDS) and the Loader."""

import gc
import re
import tempfile
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train import data as D


# --------------------------------------------------------------------------
# digits


def test_digits_offline_split():
    train = D.load_dataset("digits", split="train")
    val = D.load_dataset("digits", split="val")
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) <= 10  # stratified rounding per class
    assert train.num_classes == val.num_classes == 10
    assert train.class_names == [str(i) for i in range(10)]
    image, label = train[0]
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert 0 <= label < 10
    for source in (train, val):
        counts = np.bincount(source.labels, minlength=10)
        assert (counts > 0).all() and counts.max() - counts.min() < 0.1 * counts.mean() + 2
    # No image is in both splits (digits has a few exact duplicates, so
    # compare the split indices, which must be a partition).
    from sklearn.datasets import load_digits

    t, v = D.stratified_split(load_digits().target, 0.2, seed=0)
    assert len(np.intersect1d(t, v)) == 0 and len(t) + len(v) == 1797
    assert len(v) == len(val)


def test_digits_split_depends_on_seed_only():
    a = D.load_dataset("digits", split="val", seed=0)
    b = D.load_dataset("digits", split="val", seed=0)
    c = D.load_dataset("digits", split="val", seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


# --------------------------------------------------------------------------
# image folders

CLASSES = ["cat", "dog", "eel"]


def _write_folder(root, per_class=4, corrupt=None):
    """Class c's images are filled with gray level 40 + 80 c; sizes and formats vary."""
    files = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ext = "jpg" if i == 0 else "png"
            path = root / name / f"img{i}.{ext}"
            size = (12 + 3 * i, 9 + 2 * c)  # (width, height), varying shapes
            mode, channels = ("L", 1) if i == 1 else ("RGB", 3)
            Image.new(mode, size, (40 + 80 * c,) * channels).save(path)
            files.append(str(path))
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    if corrupt:
        path = root / corrupt
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        files.append(str(path))
    return files


def _check_colors(source):
    for i in range(len(source)):
        image, label = source[i]
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(int) - (40 + 80 * label)).max() <= 3  # JPEG error


def test_folder_flat_layout_split(tmp_path):
    files = _write_folder(tmp_path / "pets")
    kw = dict(storage_size=16, val_fraction=0.25)
    train = D.load_dataset(str(tmp_path / "pets"), split="train", **kw)
    val = D.load_dataset(f"folder:{tmp_path / 'pets'}", split="val", **kw)
    assert train.class_names == val.class_names == CLASSES and train.num_classes == 3
    assert len(train) == 9 and len(val) == 3
    assert sorted(train.files + val.files) == sorted(files)
    assert sorted(val.labels.tolist()) == [0, 1, 2]  # stratified
    _check_colors(train)
    _check_colors(val)
    again = D.load_dataset(str(tmp_path / "pets"), split="val", **kw)
    assert again.files == val.files
    other = [
        D.load_dataset(str(tmp_path / "pets"), split="val", seed=s, **kw).files for s in range(1, 6)
    ]
    assert any(o != val.files for o in other)


def test_folder_train_val_layout(tmp_path):
    _write_folder(tmp_path / "ds" / "train", per_class=3)
    _write_folder(tmp_path / "ds" / "val", per_class=2)
    train = D.load_dataset(str(tmp_path / "ds"), split="train", storage_size=16)
    val = D.load_dataset(str(tmp_path / "ds"), split="val", storage_size=16)
    assert (len(train), len(val)) == (9, 6)
    assert all("/val/" in f for f in val.files) and all("/train/" in f for f in train.files)
    _check_colors(val)


def test_corrupt_image_names_file(tmp_path):
    _write_folder(tmp_path, corrupt="dog/broken.png")
    source = D.load_dataset(str(tmp_path), split="train", storage_size=16, val_fraction=0.01)
    bad = source.files.index(str(tmp_path / "dog" / "broken.png"))
    with pytest.raises(D.DataError, match=r"cannot decode image .*dog/broken\.png: "):
        source[bad]
    # Through the loader the error comes out of the worker thread unchanged.
    loader = D.Loader(source, 13, shuffle=False, drop_remainder=False, num_epochs=1)
    with pytest.raises(D.DataError, match=r"broken\.png"):
        list(loader)


def test_skip_bad_counts_and_substitutes(tmp_path):
    _write_folder(tmp_path, corrupt="dog/broken.png")
    source = D.load_dataset(
        str(tmp_path), split="train", storage_size=16, val_fraction=0.01, skip_bad=True
    )
    loader = D.Loader(source, 4, shuffle=True, drop_remainder=False, num_epochs=2)
    batches = list(loader)
    assert loader.num_bad == 1 and source.bad_files == {str(tmp_path / "dog" / "broken.png")}
    assert sum(b["mask"].sum() for b in batches) == 2 * len(source)
    for b in batches:
        for image, label, ok in zip(b["image"], b["label"], b["mask"]):
            if ok:
                assert np.abs(image.astype(int) - (40 + 80 * label)).max() <= 3


@pytest.mark.parametrize(
    "spec,setup,message",
    [
        ("imagenet", None, r"unknown dataset spec 'imagenet'"),
        ("{tmp}/missing", None, r"image folder .*/missing does not exist"),
        ("{tmp}", "empty_class", r"class folder .*/eel has no .jpg/.jpeg/.png/.* images"),
        ("{tmp}", "no_classes", r"image folder .* has no class subfolders"),
        ("{tmp}", "train_only", r"image folder .* has a train/ folder but no val/: give both"),
        (
            "tfds:no_such_dataset_xyz",
            None,
            r"unknown tfds dataset 'no_such_dataset_xyz': Dataset no_such_dataset_xyz not found",
        ),
        ("tfds:mnist:train:val:extra", None, r"bad tfds spec"),
    ],
)
def test_bad_input_one_clear_line(tmp_path, spec, setup, message):
    if setup == "empty_class":
        _write_folder(tmp_path)
        for f in (tmp_path / "eel").iterdir():
            f.unlink()
    elif setup == "no_classes":
        (tmp_path / "x.png").write_bytes(b"")
    elif setup == "train_only":
        _write_folder(tmp_path / "train")
    with pytest.raises(D.DataError, match=message) as info:
        D.load_dataset(spec.format(tmp=tmp_path), split="train")
    assert "\n" not in str(info.value)


def test_parse_spec():
    assert D.parse_spec("tfds:cifar10:train[:90%]:train[90%:]") == D.DatasetSpec(
        "tfds", "cifar10", "train[:90%]", "train[90%:]"
    )
    assert D.parse_spec("tfds:mnist/cfg:3.*.*:train+test") == D.DatasetSpec(
        "tfds", "mnist/cfg:3.*.*", "train+test"
    )
    assert D.parse_spec("tfds:cifar10:3.0.2") == D.DatasetSpec("tfds", "cifar10:3.0.2")
    assert D.parse_spec("digits") == D.DatasetSpec("digits", "digits")
    assert D.parse_spec("./pets") == D.DatasetSpec("folder", "./pets")
    with pytest.raises(D.DataError):
        D.load_dataset("digits", split="test")


# --------------------------------------------------------------------------
# TFDS


def test_tfds_mock_data_source():
    """tfds.testing.mock_data mocks tfds.data_source too (checked on tfds 4.9.10).

    USE_CODE generates random examples from the feature spec; AUTO does the
    same here because the tfds wheel ships no metadata files for mnist, and
    USE_FILES fails for that reason. Mocked splits ignore slicing (every split
    has num_examples), so slicing itself is tested on a prepared dataset below.
    """
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        train = D.load_dataset("tfds:mnist", split="train")
        val = D.load_dataset("tfds:mnist:train:test", split="val")
        assert isinstance(train, D.TfdsSource) and len(train) == len(val) == 24
        assert train.num_classes == 10 and train.storage_size is None
        # mnist has no validation split: the default holds out the train tail.
        assert train.name == "mnist/train[:90%]" and val.name == "mnist/test"
        assert D.load_dataset("tfds:mnist", split="val").name == "mnist/train[90%:]"
        image, label = train[3]
        assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and 0 <= label < 10
        batch = next(iter(D.Loader(train, 8, seed=1, num_epochs=1)))
        assert batch["image"].shape == (8, 28, 28, 1) and batch["mask"].all()


def test_tfds_features_are_chosen_or_named():
    """cifar100 has two ClassLabels: 'label' (100 classes) by default, 'coarse_label' (20
    superclasses) when named; a name that is no such feature is one line listing them."""
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        fine = D.load_dataset("tfds:cifar100", split="train")
        coarse = D.load_dataset("tfds:cifar100", split="val", label_feature="coarse_label",
                                image_feature="image")
        assert (fine.label_key, fine.num_classes) == ("label", 100)
        assert (coarse.label_key, coarse.image_key, coarse.num_classes) == (
            "coarse_label", "image", 20)
        example = coarse.data_source[0]
        assert coarse[0][1] == int(example["coarse_label"]) and 0 <= coarse[0][1] < 20
        every = "all: id, image, label, coarse_label"
        for kw, message in (
                ({"label_feature": "id"}, "--label-feature id: not a ClassLabel feature of "
                 "tfds dataset 'cifar100' (ClassLabel features: label, coarse_label; " + every),
                ({"label_feature": "fine"}, "--label-feature fine: not a feature of"),
                ({"image_feature": "coarse_label"}, "--image-feature coarse_label: not an "
                 "image feature of tfds dataset 'cifar100' (image features: image; " + every)):
            with pytest.raises(D.DataError, match=re.escape(message)):
                D.load_dataset("tfds:cifar100", split="train", **kw)
    with pytest.raises(D.DataError, match="--label-feature is for tfds datasets; 'digits'"):
        D.load_dataset("digits", split="train", label_feature="label")


def test_tfds_builder_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """tfds makes a ``mkdtemp("tfds")`` folder for every builder of a dataset with no
    local metadata and never removes it (it is made here: one per plain
    ``tfds.builder`` call); loading through train.data leaves none."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        tfds.builder("mnist")
        leaked = [p.name for p in tmp_path.iterdir()]
        assert len(leaked) == 1 and leaked[0].endswith("tfds"), leaked
        for p in tmp_path.iterdir():
            p.rmdir()
        assert len(D.load_dataset("tfds:mnist", split="train")) == 8
        assert len(D.load_dataset("tfds:mnist", split="val")) == 8
    assert list(tmp_path.iterdir()) == [] and tempfile.gettempdir() == str(tmp_path)


class JaxnetsTinyImages(tfds.core.GeneratorBasedBuilder):
    """Prepared for real (array_record) in a temp dir; varying image sizes, pixel = example id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: encoding an Image feature needs TensorFlow.
                    "image": tfds.features.Tensor(
                        shape=(None, None, 3), dtype=np.uint8, encoding="zlib"
                    ),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 20), "test": self._generate_examples(100, 6)}

    def _generate_examples(self, first, count):
        for i in range(first, first + count):
            yield i, {"image": np.full((6 + i % 3, 5, 3), i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with D._tfds_scratch():  # a builder before its dataset_info.json: tfds's leaked folder
        JaxnetsTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _ids(source):
    return sorted(int(source[i][0][0, 0, 0]) for i in range(len(source)))


def test_tfds_prepared_splits(tiny_tfds):
    kw = dict(data_dir=tiny_tfds, storage_size=8)
    train = D.load_dataset("tfds:jaxnets_tiny_images", split="train", **kw)
    val = D.load_dataset("tfds:jaxnets_tiny_images", split="val", **kw)
    assert train.class_names == ["a", "b", "c"]
    assert sorted(_ids(train) + _ids(val)) == list(range(20)) and len(val) == 2  # 10% tail of train
    image, label = train[0]
    # Variable shapes are resized to the storage size.
    assert image.shape == (8, 8, 3) and label == image[0, 0, 0] % 3
    test = D.load_dataset("tfds:jaxnets_tiny_images:train[:50%]:test", split="val", **kw)
    assert _ids(test) == list(range(100, 106))
    half = D.load_dataset("tfds:jaxnets_tiny_images:train[:50%]:test", split="train", **kw)
    rest = D.load_dataset("tfds:jaxnets_tiny_images:train[50%:]", split="train", **kw)
    assert len(half) == 10 and sorted(_ids(half) + _ids(rest)) == list(range(20))


def test_tfds_errors(tiny_tfds, tmp_path):
    message = r"'jaxnets_tiny_images' cannot read split 'valid'"
    with pytest.raises(D.DataError, match=message) as info:
        D.load_dataset("tfds:jaxnets_tiny_images:train:valid", split="val", data_dir=tiny_tfds)
    assert "\n" not in str(info.value)
    message = r"'jaxnets_tiny_images' is not prepared in .*tfds build"
    with pytest.raises(D.DataError, match=message) as info:
        D.load_dataset("tfds:jaxnets_tiny_images", split="train", data_dir=str(tmp_path))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------
# Loader


def _array_source(n=23, shape=(2, 2, 1)):
    images = np.zeros((n,) + shape, np.uint8) + np.arange(n, dtype=np.uint8)[:, None, None, None]
    return D.ArraySource("ids", images, np.arange(n) % 3, ["a", "b", "c"])


class SlowSource:
    """Per-item reads (no read_many), counting them; optionally failing at one index."""

    name, num_classes, class_names = "slow", 3, ["a", "b", "c"]

    def __init__(self, n=23, fail_at=None, delay=0.0):
        self.n, self.fail_at, self.delay, self.reads = n, fail_at, delay, 0
        self._lock = threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with self._lock:
            self.reads += 1
        time.sleep(self.delay)
        if i == self.fail_at:
            raise OSError(f"disk on fire at {i}")
        return np.full((2, 2, 1), i % 256, np.uint8), i % 3


def _take(loader, count):
    with iter(loader) as it:
        return [next(it) for _ in range(count)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_loader_seeded_and_epochs_differ():
    source = _array_source()
    a = _take(D.Loader(source, 5, seed=3), 8)
    b = _take(D.Loader(source, 5, seed=3), 8)
    c = _take(D.Loader(source, 5, seed=4), 8)
    assert _same(a, b) and not _same(a, c)
    assert D.Loader(source, 5).steps_per_epoch == 4  # drop_remainder: 23 // 5
    for batch in a:
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["index"])
        np.testing.assert_array_equal(batch["label"], batch["index"] % 3)
    epoch0 = np.concatenate([x["index"] for x in a[:4]])
    epoch1 = np.concatenate([x["index"] for x in a[4:]])
    assert len(set(epoch0)) == 20 and not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(epoch1, np.random.default_rng(3 + 1).permutation(23)[:20])


def test_loader_resume_matches_continuing():
    source = _array_source()
    full = _take(D.Loader(source, 5, seed=7), 11)
    resumed = _take(D.Loader(source, 5, seed=7, start_step=6), 5)
    assert _same(full[6:], resumed)
    with iter(D.Loader(source, 5, seed=7, start_step=6)) as it:
        next(it)
        assert it.step == 7


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_loader_process_shards_partition_global_batch(drop_remainder):
    source = _array_source()
    kw = dict(seed=2, drop_remainder=drop_remainder, num_epochs=2)
    whole = list(D.Loader(source, 6, **kw))
    parts = [list(D.Loader(source, 6, process_index=p, process_count=2, **kw)) for p in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == (3 if drop_remainder else 4) * 2
    for g, p0, p1 in zip(whole, *parts):
        assert p0["image"].shape[0] == p1["image"].shape[0] == 3
        real0, real1 = set(p0["index"][p0["mask"]]), set(p1["index"][p1["mask"]])
        assert not real0 & real1
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])


def test_loader_pads_last_batch_with_mask():
    batches = list(D.Loader(_array_source(), 5, shuffle=False, drop_remainder=False, num_epochs=1))
    assert len(batches) == 5
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], [True, True, True, False, False])
    np.testing.assert_array_equal(last["index"], [20, 21, 22, -1, -1])
    assert (last["image"][3:] == 0).all() and last["image"].shape == (5, 2, 2, 1)


def test_loader_per_item_source_and_worker_exception():
    good = SlowSource()
    a = _take(D.Loader(good, 4, seed=1, num_workers=3), 6)
    b = _take(D.Loader(_array_source(), 4, seed=1), 6)
    assert _same(a, b)  # read_many and per-item paths agree
    loader = D.Loader(SlowSource(fail_at=11), 4, shuffle=False, num_epochs=1)
    it = iter(loader)
    assert next(it)["index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(OSError, match="disk on fire at 11"):
        for _ in it:
            pass
    assert not it._thread.is_alive()


def test_loader_bounded_prefetch_and_clean_shutdown():
    source = SlowSource(n=400, delay=0.001)
    before = threading.active_count()
    it = iter(D.Loader(source, 4, prefetch=2, num_workers=2))
    next(it)
    time.sleep(0.3)
    # One batch consumed, at most `prefetch` queued and one being assembled.
    assert source.reads <= 4 * (1 + 2 + 1)
    it.close()
    assert not it._thread.is_alive()
    assert threading.active_count() <= before  # decode pool joined too
    with pytest.raises(StopIteration):
        next(it)
    # An abandoned iterator stops its thread when it is garbage collected.
    it = iter(D.Loader(source, 4, prefetch=1))
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_loader_rejects_bad_arguments():
    source = _array_source()
    with pytest.raises(D.DataError, match="divisible"):
        D.Loader(source, 5, process_count=2)
    with pytest.raises(D.DataError, match="fewer than one batch"):
        D.Loader(source, 64)
    assert D.Loader(source, 64, drop_remainder=False).steps_per_epoch == 1


def test_wide_samples_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG and a float TIFF decode to what they show (PIL's own RGB
    conversion clips them: almost all white, almost all black)."""
    from PIL import Image

    from train.data import decode_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "wide.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "float.tif")
    Image.fromarray((ramp * 255).astype(np.uint8)).save(tmp_path / "narrow.png")
    narrow = decode_image(str(tmp_path / "narrow.png"), 32).astype(int)
    for name in ("wide.png", "float.tif"):
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("I;16", "I", "F"), im.mode
        decoded = decode_image(str(tmp_path / name), 32).astype(int)
        assert decoded.shape == (32, 32, 3)
        assert np.abs(decoded - narrow).max() <= 2, name


def test_folder_takes_imagefolder_extensions_and_nested_files(tmp_path):
    """As torchvision's ImageFolder: its extensions, and images in subfolders of a
    class folder; hidden files and folders are left out."""
    files = _write_folder(tmp_path)
    extra = [tmp_path / "cat" / "more" / "deep.bmp", tmp_path / "dog" / "x.webp",
             tmp_path / "eel" / "y.TIFF"]
    for path in extra:
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (10, 10), (1, 2, 3)).save(path)
    (tmp_path / "cat" / ".hidden").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "cat" / ".hidden" / "h.png")
    found = [f for split in ("train", "val")
             for f in D.load_dataset(str(tmp_path), split=split).files]
    assert sorted(found) == sorted(files + [str(p) for p in extra])


def test_folder_spec_without_a_path():
    with pytest.raises(D.DataError, match=r"^dataset spec 'folder:' names no folder"):
        D.parse_spec("folder:")


def test_folder_order_and_labels_are_imagefolders(tmp_path):
    """Files and class indices in torchvision's ImageFolder order (a class folder's own
    files before its subfolders' files), so predictions' indices mean the same."""
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        for rel in ("b/z.png", "b/sub/a.png", "b/sub/deeper/0.jpg", "b/Y.bmp", "a/m.png",
                    "a/a b/é.png", "a/a_b/1.png", "a/a-b.png"):
            path = tmp_path / split / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6)).save(path)
    source = D.load_dataset(str(tmp_path), split="train")
    reference = ImageFolder(str(tmp_path / "train"))
    assert source.files == [path for path, _ in reference.samples]
    assert source.labels.tolist() == [label for _, label in reference.samples]
    assert source.class_names == reference.classes


def test_tfds_errors_end_cleanly():
    e = ValueError("Random access data source for file format FileFormat.TFRECORD is not "
                   "supported. Possible root causes:\n  - the dataset was built as tfrecord\n")
    assert D._tfds_error(e) == ("Random access data source for file format FileFormat.TFRECORD "
                                "is not supported.")
    assert D._tfds_error(ValueError()) == "ValueError"


# --------------------------------------------------------------------------
# Host transforms of variable-size images


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_images_are_torchvisions_eval_preset_pixel_for_pixel(tmp_path, interpolation):
    """A folder's evaluation images are what torchvision's ImageFolder loader and
    ``weights.transforms()`` (``ImageClassification``) feed a model: non-square,
    portrait, smaller than the crop before resizing, gray, and a large JPEG (no reduced
    decoding)."""
    import jax.numpy as jnp
    from torchvision.datasets.folder import default_loader
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    from train.augment import AugmentConfig, eval_transform

    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(50, 37), (37, 50), (41, 41), (90, 20), (17, 15), (36, 300)]):
        smooth = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((w, h), Image.Resampling.BICUBIC)
        files.append(tmp_path / f"{i}.png")
        image.save(files[-1])
    Image.fromarray(rng.integers(0, 256, (9, 12), dtype=np.uint8)).save(tmp_path / "gray.png")
    big = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((800, 600))
    big.save(tmp_path / "big.jpg", quality=90)
    files += [tmp_path / "gray.png", tmp_path / "big.jpg"]
    crop, resize = 32, 35  # odd margins: CenterCrop rounds half to even
    transform = D.HostTransform("eval", crop, resize, interpolation)
    preset = ImageClassification(crop_size=crop, resize_size=resize,
                                 interpolation=InterpolationMode(interpolation))
    cfg = AugmentConfig(crop_size=crop, resize_size=resize, interpolation=interpolation,
                        eval_prepared=True)
    for path in files:
        ours = D.decode_image(str(path), transform)
        assert ours.shape == (crop, crop, 3) and ours.dtype == np.uint8
        want = preset(default_loader(str(path))).numpy().transpose(1, 2, 0)
        got = np.asarray(eval_transform(jnp.asarray(ours[None]), cfg))[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=str(path))


def test_finetune_sets_storage_and_eval_transforms_of_variable_size_sources(tmp_path):
    """Training stores squares at the largest of 256, the eval resize and the crop;
    evaluation gets the eval transform; fixed-size sources are left as they are."""
    _write_folder(tmp_path / "ds" / "train", per_class=2)
    _write_folder(tmp_path / "ds" / "val", per_class=1)
    train = D.load_dataset(str(tmp_path / "ds"), split="train")
    val = D.load_dataset(str(tmp_path / "ds"), split="val")
    assert D.set_host_transforms(train, val, crop_size=299, resize_size=342,
                                 interpolation="bicubic")
    assert train.host_transform == D.HostTransform("fit", 456, interpolation="bicubic")
    assert val.host_transform == D.HostTransform("eval", 299, 342, "bicubic")
    assert train[0][0].shape == (456, 456, 3) and val[0][0].shape == (299, 299, 3)
    D.set_host_transforms(train, val, crop_size=32, resize_size=32, interpolation="bilinear")
    assert train.host_transform.size == 342  # 4/3 of 256: a 4:3 image keeps 256 rows
    batch = D.Loader(train, 4, shuffle=False).batch(0)
    image, extent = batch["image"], batch["extent"]
    for i, index in enumerate(batch["index"]):
        width, height = Image.open(train.files[index]).size
        want = (342, round(342 * width / height)) if height > width else (
            round(342 * height / width), 342)
        assert tuple(extent[i]) == want
        assert not image[i, want[0]:].any() and not image[i, :, want[1]:].any()  # padding
        assert image[i, want[0] - 1, want[1] - 1].any()  # the image's corner
    digits_train, digits_val = (D.load_dataset("digits", split=s) for s in ("train", "val"))
    assert not D.set_host_transforms(digits_train, digits_val, crop_size=224, resize_size=256,
                                     interpolation="bilinear")
    assert digits_val[0][0].shape == (8, 8, 1)


class _ListSource(list):
    """A stand-in for what ``tfds.data_source`` returns; an int entry fails to read."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(item, int):
            raise TypeError("int() argument must be a string, not 'NoneType'")
        return item


def test_tfds_images_of_other_dtypes_and_channels_are_scaled_to_8_bits():
    def source(*images, storage_size=None):
        rows = _ListSource({"image": im, "label": 1} if not isinstance(im, int) else im
                           for im in images)
        return D.TfdsSource("toy/train", rows, "image", "label", ["a", "b"], storage_size)

    ramp = np.linspace(0, 1, 16).reshape(4, 4, 1)
    as_uint8 = np.rint(ramp * 255).astype(np.uint8)
    checks = [(ramp.astype(np.float32), as_uint8),  # 0..1 floats
              ((ramp * 65535).astype(np.uint16), np.rint(np.rint(ramp * 65535) / 257)),
              (np.concatenate([as_uint8] * 3 + [np.zeros_like(as_uint8)], -1),  # RGBA
               np.concatenate([as_uint8] * 3, -1)),
              (np.concatenate([as_uint8, np.zeros_like(as_uint8)], -1), as_uint8),  # gray + alpha
              (as_uint8[:, :, 0] > 127, (as_uint8 > 127) * 255)]
    for image, want in checks:
        got, label = source(image)[0]
        assert got.dtype == np.uint8 and label == 1, image.dtype
        np.testing.assert_array_equal(got, np.asarray(want, np.uint8).reshape(got.shape))
    assert source(ramp.astype(np.float32), storage_size=8)[0][0].shape == (8, 8, 3)
    with pytest.raises(D.DataError, match=r"toy/train: example 0 has an image of shape "
                                          r"\(4, 4, 13\); images need 1 to 4 channels"):
        source(np.zeros((4, 4, 13), np.uint8))[0]
    with pytest.raises(D.DataError, match=r"toy/train: cannot read example 1: TypeError: int"):
        source(as_uint8, 7)[1]
