"""Tests of mlfd.data: sources on real data, splits, transforms and the tensor loader."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mlfd.config import AugmentSpec, DatasetSpec, ModelSpec, SpecError
from mlfd.data import (SOURCES, BatchTransform, DatasetSplits, FileImages, StreamLoader, TensorLoader, load_dataset,
                       make_loader)
from mlfd.data.sources import FASHION_MNIST_CLASSES
from mlfd.data.splits import build_splits, stratified_split
from mlfd.data.transforms import AUTOAUGMENT_VERSION, BatchedAutoAugment, autoaugment_key

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def spec(source: str = "sklearn_digits", **kw) -> DatasetSpec:
    return DatasetSpec(name=kw.pop("name", "d"), source=source, **kw)


def check_splits(ds: DatasetSplits, channels: int, size: tuple[int, int]) -> None:
    for s in (ds.train, ds.val, ds.test):
        assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
        assert s.images.shape[1:] == (channels, *size)
        assert s.labels.dtype == torch.int64 and s.labels.shape == (len(s),)
        assert int(s.labels.min()) >= 0 and int(s.labels.max()) < ds.num_classes


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


# ------------------------------------------------------------------------------------------------------------------
# Real sources
# ------------------------------------------------------------------------------------------------------------------


def test_sklearn_digits_counts_and_stratification():
    ds = load_dataset(spec())
    check_splits(ds, 1, (8, 8))
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert len(ds.test) == round(0.2 * 1797) and len(ds.val) == round(0.1 * (1797 - len(ds.test)))
    assert ds.classes == [str(i) for i in range(10)]
    for s in (ds.val, ds.test):
        assert set(s.labels.tolist()) == set(range(10))
    assert int(ds.train.images.max()) == 255
    everything = torch.cat([ds.train.images, ds.val.images, ds.test.images]).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] > 1700  # splits are disjoint (digits has a few duplicates)


def test_mnist5k():
    ds = load_dataset(spec("mnist5k", options={"test_fraction": 0.3}))
    check_splits(ds, 1, (28, 28))
    assert len(ds.train) + len(ds.val) + len(ds.test) == 5000 and len(ds.test) == 1500
    assert np.bincount(ds.test.labels.numpy()).tolist() == [150] * 10


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist():
    ds = load_dataset(spec("fashion_mnist"))
    check_splits(ds, 1, (28, 28))
    assert len(ds.train) + len(ds.val) == 60000 and len(ds.val) == 6000 and len(ds.test) == 10000
    assert ds.classes == FASHION_MNIST_CLASSES
    assert np.bincount(ds.val.labels.numpy()).tolist() == [600] * 10
    assert ds.mean == pytest.approx((0.286,) * 3, abs=2e-3) and ds.std == pytest.approx((0.353,) * 3, abs=2e-3)


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(SpecError, match=r"^datasets\.d\.options\.root: .*apt-get install dataset-fashion-mnist"):
        build_splits(spec("fashion_mnist", options={"root": str(tmp_path / "nope")}))
    with pytest.raises(SpecError, match=r"options\.root: train-images-idx3-ubyte\[\.gz\] not found"):
        build_splits(spec("fashion_mnist", options={"root": str(tmp_path)}))


def test_unknown_option_lists_allowed():
    with pytest.raises(SpecError, match=r"^datasets\.d\.options\.rot: unknown option .*allowed: \['test_fraction'\]"):
        build_splits(spec(options={"rot": 1}))
    with pytest.raises(SpecError, match=r"options\.test_fraction: must be a number in \(0, 1\)"):
        build_splits(spec(options={"test_fraction": 1.5}))
    assert sorted(SOURCES) == ["fashion_mnist", "folder", "mnist5k", "parquet", "sklearn_digits", "torchvision"]


# ------------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------------


def test_split_determinism_and_memoisation():
    a, b = build_splits(spec(split_seed=3)), build_splits(spec(split_seed=3))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).images, getattr(b, name).images)
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels)
    c = build_splits(spec(split_seed=4))
    assert not torch.equal(a.val.images, c.val.images) and not torch.equal(a.test.images, c.test.images)
    first = load_dataset(spec(split_seed=3))
    assert load_dataset(spec(split_seed=3, model=ModelSpec(input_size=64))) is first
    assert load_dataset(spec(split_seed=4)) is not first


def test_stratified_split_allocation():
    labels = np.repeat(np.arange(3), [50, 30, 2])
    taken, rest = stratified_split(labels, 10, np.random.default_rng(0), keep_rest=True)
    assert len(taken) == 10 and len(rest) == 72 and not set(taken) & set(rest)
    assert np.bincount(labels[taken], minlength=3).tolist() == [6, 3, 1]
    assert set(labels[rest]) == {0, 1, 2}


def test_classes_subset_relabels_in_given_order():
    full = load_dataset(spec())
    ds = load_dataset(spec(classes=[7, "3"]))
    assert ds.classes == ["7", "3"] and ds.num_classes == 2
    for s in (ds.train, ds.val, ds.test):
        assert set(s.labels.tolist()) == {0, 1}
    total = sum(len(s) for s in (ds.train, ds.val, ds.test))
    source_counts = sum(int((s.labels == 7).sum() + (s.labels == 3).sum()) for s in (full.train, full.val, full.test))
    assert total == source_counts
    with pytest.raises(SpecError, match=r"^datasets\.d\.classes: unknown class 'cat'; allowed: indices 0\.\.9"):
        build_splits(spec(classes=[1, "cat"]))


def test_max_subsets_are_stratified_and_deterministic():
    s = spec(max_train=100, max_val=20, max_test=30)
    ds = build_splits(s)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (100, 20, 30)
    assert np.bincount(ds.train.labels.numpy()).tolist() == [10] * 10
    assert torch.equal(build_splits(s).train.images, ds.train.images)


def test_mean_std_match_train_images():
    ds = load_dataset(spec())
    x = ds.train.images.double() / 255
    assert ds.mean == pytest.approx((x.mean().item(),) * 3)
    assert ds.std == pytest.approx((x.std(unbiased=False).item(),) * 3)
    assert len(ds.mean) == len(ds.std) == 3


# ------------------------------------------------------------------------------------------------------------------
# folder
# ------------------------------------------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    """Classes b_shirt, a_coat, C_up (sorted: C_up, a_coat, b_shirt) in modes L, RGB, RGBA and I;16, mixed sizes."""
    (root / "b_shirt").mkdir(parents=True)
    (root / "a_coat" / "nested").mkdir(parents=True)
    (root / "C_up").mkdir()
    Image.fromarray(np.full((10, 12), 200, np.uint8), "L").save(root / "C_up" / "0.png")  # first image: 10x12
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(root / "C_up" / "1.jpg", quality=100)
    Image.fromarray(np.full((20, 24, 3), (255, 0, 0), np.uint8), "RGB").save(root / "a_coat" / "x.png")
    Image.fromarray(np.full((10, 12, 4), (0, 255, 0, 3), np.uint8), "RGBA").save(root / "a_coat" / "nested" / "y.png")
    Image.fromarray(np.full((10, 12), 257 * 100, np.uint16)).save(root / "b_shirt" / "z.png")
    Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(root / "b_shirt" / "w.png")
    (root / "README.txt").write_text("not a class")


def test_folder_source_modes_sizes_and_order(tmp_path):
    make_tree(tmp_path)
    assert Image.open(tmp_path / "b_shirt" / "z.png").mode == "I;16"
    raw = SOURCES["folder"]({"root": str(tmp_path)}, "opts")
    assert raw.classes == ["C_up", "a_coat", "b_shirt"] and raw.test is None and raw.val is None
    x, y = raw.train.images, raw.train.labels
    assert x.shape == (6, 3, 10, 12) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert (x[0] == 200).all() and (x[1] == 7).all()
    assert x[2, :, 4, 4].tolist() == [0, 255, 0] and x[3, :, 4, 4].tolist() == [255, 0, 0]  # nested/y.png < x.png
    assert (x[4] == 255).all() and (x[5] == 100).all()  # sorted: w.png (65535) before z.png (25700)
    gray = SOURCES["folder"]({"root": str(tmp_path), "mode": "L", "image_size": [5, 6]}, "opts")
    assert gray.train.images.shape == (6, 1, 5, 6)


def test_folder_errors(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "a_coat" / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(SpecError, match=rf"^{bad}: not a readable image"):
        SOURCES["folder"]({"root": str(tmp_path)}, "opts")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecError, match=r"^opts\.root: no class folders"):
        SOURCES["folder"]({"root": str(empty)}, "opts")
    with pytest.raises(SpecError, match=r"^opts\.mode: got 'CMYK'; allowed: L, RGB"):
        SOURCES["folder"]({"root": str(tmp_path), "mode": "CMYK"}, "opts")


def test_folder_split_layout(tmp_path):
    for split, n in (("train", 12), ("test", 3)):
        for c in ("dog", "cat"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    ds = build_splits(spec("folder", options={"root": str(tmp_path)}, val_fraction=0.25))
    check_splits(ds, 3, (6, 6))
    assert ds.classes == ["cat", "dog"] and (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)


def _digit_tree(root: Path, n: int = 23) -> None:
    """``n`` real 8x8 digits (of classes 0-2) as PNG files in root/<class>/, and 6 more in root/test/."""
    from sklearn.datasets import load_digits

    bunch = load_digits(n_class=3)
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    for i in range(n + 6):
        split = "test" if i >= n else "train"
        d = root / split / str(bunch.target[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], "L").save(d / f"{i:03d}.png")


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_reads_the_same_images(tmp_path, workers):
    """`stream: true` leaves the images in their files (FileImages) and reads back exactly the in-memory images,
    labels, splits and statistics."""
    make_tree(tmp_path)
    mem = SOURCES["folder"]({"root": str(tmp_path)}, "opts")
    st = SOURCES["folder"]({"root": str(tmp_path), "stream": True, "workers": workers}, "opts")
    assert isinstance(st.train.images, FileImages) and st.train.images.workers == workers
    assert st.train.images.shape == mem.train.images.shape == (6, 3, 10, 12) and st.train.images.dtype == torch.uint8
    assert torch.equal(torch.cat(list(st.train.images.split(4))), mem.train.images)
    assert [len(c) for c in st.train.images.split(4)] == [4, 2]
    assert torch.equal(st.train.labels, mem.train.labels) and st.classes == mem.classes
    assert torch.equal(torch.cat(list(st.train.images[torch.tensor([5, 0])].split(8))), mem.train.images[[5, 0]])

    _digit_tree(tmp_path / "digits")
    opts = {"root": str(tmp_path / "digits"), "mode": "L"}
    a = build_splits(spec("folder", options=opts, val_fraction=0.25))
    b = build_splits(spec("folder", options={**opts, "stream": True, "workers": workers}, val_fraction=0.25))
    assert (len(a.train), len(a.val), len(a.test)) == (len(b.train), len(b.val), len(b.test)) == (17, 6, 6)
    for name in ("train", "val", "test"):
        x, y = getattr(a, name), getattr(b, name)
        assert isinstance(y.images, FileImages) and torch.equal(x.labels, y.labels)
        assert torch.equal(torch.cat(list(y.images.split(5))), x.images)
    assert b.mean == a.mean and b.std == a.std and a.mean[0] == pytest.approx(0.29934, abs=1e-5)


def test_large_streamed_split_takes_its_statistics_from_a_seeded_sample(tmp_path, monkeypatch):
    """Over STREAM_STATS_IMAGES train images, a streamed split's mean/std are those of a seeded sample of that many
    (the same sample every load), not of all of them: every process loading the dataset decodes them."""
    import mlfd.data.splits as splits

    _digit_tree(tmp_path)
    opts = {"root": str(tmp_path), "mode": "L"}
    mem = build_splits(spec("folder", options=opts, val_fraction=0.25))
    monkeypatch.setattr(splits, "STREAM_STATS_IMAGES", 5)
    a = build_splits(spec("folder", options={**opts, "stream": True}, val_fraction=0.25))
    b = build_splits(spec("folder", options={**opts, "stream": True}, val_fraction=0.25))
    assert a.mean == b.mean and a.mean != mem.mean and len(a.train) == 17
    pick = np.sort(splits._rng(0, "stream_stats").choice(17, 5, replace=False))
    assert a.mean == splits.channel_stats(mem.train.images[torch.from_numpy(pick)])[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_loader_gives_the_tensor_loaders_batches(tmp_path, workers):
    """Batch for batch, epoch after epoch (and from a resumed epoch), the streamed loader yields what the in-memory
    loader yields: same indices, same pixels, same labels; its decoding workers persist across epochs."""
    _digit_tree(tmp_path)
    mem = SOURCES["folder"]({"root": str(tmp_path), "mode": "L"}, "opts").train
    st = SOURCES["folder"]({"root": str(tmp_path), "mode": "L", "stream": True, "workers": workers}, "opts").train
    for shuffle, drop_last in ((True, False), (False, False), (True, True)):
        ref = TensorLoader(mem.images, mem.labels, 5, shuffle, seed=3, drop_last=drop_last)
        got = make_loader(st.images, st.labels, 5, shuffle, seed=3, drop_last=drop_last)
        assert isinstance(got, StreamLoader) and len(got) == len(ref) == (4 if drop_last else 5)
        for epoch in range(2):
            pairs = list(zip(ref, got, strict=True))
            for (i, x, y), (j, u, v) in pairs:
                assert torch.equal(i, j) and torch.equal(x, u) and torch.equal(y, v) and u.dtype == torch.uint8
            if epoch == 0 and workers:
                first = got._loader._iterator
        if workers:
            assert got._loader._iterator is first  # the same worker processes served both epochs
        ref.epoch = got.epoch = 7  # a resumed run: permutation seed + 7
        assert all(torch.equal(a[1], b[1]) for a, b in zip(ref, got, strict=True))


def test_streamed_folder_errors(tmp_path):
    """A non-image file fails at load (its header is checked); a truncated image in train fails at load too (the
    statistics pass decodes train), in test at its first read; each as one line naming the file."""
    _digit_tree(tmp_path)
    opts = {"root": str(tmp_path), "mode": "L", "stream": True, "workers": 2}
    with pytest.raises(SpecError, match=r"^opts\.stream: expected true/false, got 'yes'$"):
        SOURCES["folder"]({**opts, "stream": "yes"}, "opts")
    with pytest.raises(SpecError, match=r"^opts\.workers: expected an integer >= 0, got -1$"):
        SOURCES["folder"]({**opts, "workers": -1}, "opts")
    bad = tmp_path / "train" / "1" / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(SpecError, match=rf"^{bad}: not a readable image \(UnidentifiedImageError"):
        SOURCES["folder"](opts, "opts")
    bad.unlink()
    good = sorted((tmp_path / "test" / "2").iterdir())[0]
    whole = good.read_bytes()
    good.write_bytes(whole[:60])  # the header parses, the pixels are cut
    ds = build_splits(spec("folder", options=opts, val_fraction=0.25))  # test is not decoded at load
    with pytest.raises(SpecError) as err:
        list(make_loader(ds.test.images, ds.test.labels, 4, False))
    assert str(err.value).startswith(f"{good}: not a readable image (") and "\n" not in str(err.value)
    train_file = sorted((tmp_path / "train" / "0").iterdir())[0]
    train_file.write_bytes(train_file.read_bytes()[:60])
    with pytest.raises(SpecError, match=rf"^{train_file}: not a readable image \([^\n]*$"):
        build_splits(spec("folder", options=opts, val_fraction=0.25))


WNIDS = ["n02123045", "n01443537", "n09999999"]  # sorted: n01443537, n02123045, n09999999


def _jpeg(file: Path, value: int, size: int = 16) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8), "RGB").save(file, quality=95)


def tiny_imagenet(root: Path, per_class: int = 5) -> dict[str, str]:
    """A TinyImageNet-200 replica with three classes: train/<wnid>/images/*.JPEG beside <wnid>_boxes.txt,
    val/images/*.JPEG labelled by val/val_annotations.txt, an unlabelled test/images, wnids.txt and words.txt.

    Returns:
        Val file name -> its wnid (the annotation).
    """
    for k, wnid in enumerate(WNIDS):
        for i in range(per_class):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 40 * k + i)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t15\t15\n" for i in range(per_class)))
    val = {f"val_{i}.JPEG": WNIDS[(i * 2) % 3] for i in range(7)}  # 3 x n02123045, 2 x n01443537, 2 x n09999999
    for i, (name, wnid) in enumerate(val.items()):
        _jpeg(root / "val" / "images" / name, 200 + i)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t1\t2\t13\t14\n" for name, wnid in val.items()))
    _jpeg(root / "test" / "images" / "test_0.JPEG", 9)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    return val


@pytest.mark.parametrize("stream", [False, True])
def test_tinyimagenet_layout(tmp_path, stream):
    """TinyImageNet read as distributed: classes are the sorted wnids, val (labelled by its annotations) is the test
    split, the val split is carved from train; streamed or not, the same images and labels."""
    val = tiny_imagenet(tmp_path)
    opts = {"root": str(tmp_path), "layout": "tinyimagenet", "stream": stream, "workers": 0}
    raw = SOURCES["folder"](opts, "opts")
    assert raw.classes == ["n01443537", "n02123045", "n09999999"] and raw.val is None
    assert len(raw.train) == 15 and raw.train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert raw.train.images.shape == (15, 3, 16, 16) and raw.test.images.shape == (7, 3, 16, 16)
    x = torch.cat(list(raw.train.images.split(4))) if stream else raw.train.images
    # train/n01443537 holds the second wnid's images (40 * 1 + i); JPEG keeps a flat image within 1-2 levels
    assert (x[:5].float().mean((1, 2, 3)) - torch.tensor([40.0, 41, 42, 43, 44])).abs().max() < 2
    files = raw.test.images.files if stream else None
    by_label = sorted(val, key=lambda name: (raw.classes.index(val[name]), name))
    assert raw.test.labels.tolist() == [raw.classes.index(val[n]) for n in by_label] == [0, 0, 1, 1, 1, 2, 2]
    if stream:
        assert [Path(f).name for f in files] == by_label
    ds = build_splits(spec("folder", options=opts, val_fraction=0.2))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 3, 7)
    assert sorted(ds.val.labels.tolist()) == [0, 1, 2] and torch.equal(ds.test.labels, raw.test.labels)
    if stream:
        mem = build_splits(spec("folder", options={**opts, "stream": False}, val_fraction=0.2))
        for name in ("train", "val", "test"):
            a, b = getattr(mem, name), getattr(ds, name)
            assert torch.equal(a.labels, b.labels) and torch.equal(torch.cat(list(b.images.split(5))), a.images)
        assert mem.mean == ds.mean and mem.std == ds.std


def test_tinyimagenet_folder_without_its_layout_says_so(tmp_path):
    tiny_imagenet(tmp_path)
    with pytest.raises(SpecError, match=r"^\S+/val/images: class 'images' is not in \S+/train; allowed: .*"
                                        r"\(a TinyImageNet folder: set layout: tinyimagenet\)$"):
        SOURCES["folder"]({"root": str(tmp_path)}, "opts")


@pytest.mark.parametrize("stream", [False, True])
def test_imagenet_sketch_folder(tmp_path, stream):
    """ImageNet-Sketch's sketch/<wnid>/*.JPEG (images of different sizes, no splits): classes sorted by wnid, every
    image resized to the first one's size, test carved by test_fraction."""
    for k, wnid in enumerate(WNIDS):
        for i in range(5):
            _jpeg(tmp_path / "sketch" / wnid / f"sketch_{i}.JPEG", 30 * k + i, size=16 + 4 * i)
    opts = {"root": str(tmp_path / "sketch"), "stream": stream, "workers": 0, "test_fraction": 0.2}
    raw = SOURCES["folder"](opts, "opts")
    assert raw.classes == sorted(WNIDS) and raw.test is None and raw.val is None
    assert raw.train.images.shape == (15, 3, 16, 16) and raw.train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    ds = build_splits(spec("folder", options=opts, val_fraction=0.25))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 3)
    assert sorted(ds.test.labels.tolist()) == [0, 1, 2] and sorted(ds.val.labels.tolist()) == [0, 1, 2]
    if stream:
        mem = build_splits(spec("folder", options={**opts, "stream": False}, val_fraction=0.25))
        for name in ("train", "val", "test"):
            a, b = getattr(mem, name), getattr(ds, name)
            assert torch.equal(a.labels, b.labels) and torch.equal(torch.cat(list(b.images.split(4))), a.images)


def test_tinyimagenet_layout_errors(tmp_path):
    """Each malformation of the TinyImageNet layout is one line naming the file or folder at fault."""
    val = tiny_imagenet(tmp_path)
    opts = {"root": str(tmp_path), "layout": "tinyimagenet"}
    ann = tmp_path / "val" / "val_annotations.txt"
    text = ann.read_text()

    def fails(pattern: str) -> None:
        with pytest.raises(SpecError) as err:
            SOURCES["folder"](opts, "opts")
        msg = str(err.value)
        assert "\n" not in msg and re.match(pattern, msg), msg

    with pytest.raises(SpecError, match=r"^opts\.layout: got 'imagenet'; allowed: imagefolder, tinyimagenet$"):
        SOURCES["folder"]({**opts, "layout": "imagenet"}, "opts")
    ann.write_text(text.replace("n01443537", "n00000001", 1))
    fails(rf"^{ann}:\d+: class 'n00000001' of val_\d+\.JPEG is not a class folder of {tmp_path}/train$")
    ann.write_text(text.replace("\t", " "))
    fails(rf"^{ann}:1: expected 'file<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h', got 'val_0.JPEG n02123045 1 2 13 14'$")
    ann.write_text(text + text.splitlines(keepends=True)[0])
    fails(rf"^{ann}:8: val_0\.JPEG is listed twice$")
    ann.write_text("".join(text.splitlines(keepends=True)[1:]))
    fails(rf"^{tmp_path}/val/images/val_0\.JPEG: not listed in {ann}$")
    ann.write_text(text + "val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    fails(rf"^{tmp_path}/val/images/val_99\.JPEG: listed in {ann} but not found$")
    ann.unlink()
    fails(rf"^opts\.root: {ann} not found; layout 'tinyimagenet' expects train/<wnid>/images/\*\.JPEG, ")
    ann.write_text(text)
    (tmp_path / "wnids.txt").write_text("n01443537\n")
    fails(rf"^{tmp_path}/wnids\.txt: lists 1 classes, {tmp_path}/train has 3 class folders; 'n02123045' is in one "
          r"only$")
    (tmp_path / "wnids.txt").unlink()
    images = tmp_path / "train" / "n09999999" / "images"
    for f in images.iterdir():
        f.unlink()
    fails(rf"^{images}: no images; layout 'tinyimagenet' expects")
    _jpeg(images / "a.JPEG", 1)
    (images / "notes.txt").write_text("hello")
    fails(rf"^{images}/notes\.txt: not a readable image")
    assert len(val) == 7


# ------------------------------------------------------------------------------------------------------------------
# parquet
# ------------------------------------------------------------------------------------------------------------------


def image_table(n: int = 12) -> pa.Table:
    cells = [png_bytes(Image.fromarray(np.full((7, 7), 10 * i, np.uint8), "L")) for i in range(n)]
    return pa.table({"img": cells, "y": ["zebra" if i % 2 else "ant" for i in range(n)],
                     "part": ["test" if i >= n - 4 else "train" for i in range(n)]})


def test_parquet_source(tmp_path):
    pq.write_table(image_table(), tmp_path / "t.parquet")
    opts = {"path": str(tmp_path / "t.parquet"), "image_column": "img", "label_column": "y", "mode": "L"}
    raw = SOURCES["parquet"](opts, "opts")
    assert raw.classes == ["ant", "zebra"] and raw.test is None
    assert raw.train.images.shape == (12, 1, 7, 7) and raw.train.labels.tolist() == [0, 1] * 6
    assert raw.train.images[:, 0, 0, 0].tolist() == [10 * i for i in range(12)]
    ds = build_splits(spec("parquet", options={**opts, "split_column": "part"}))
    assert len(ds.test) == 4 and len(ds.train) + len(ds.val) == 8


def test_parquet_struct_cells_and_arrow(tmp_path):
    structs = [{"bytes": png_bytes(Image.new("RGB", (5, 4), (i, 0, 0))), "path": None} for i in range(4)]
    table = pa.table({"image": structs, "label": [0, 1, 0, 1]})
    with pa.ipc.new_file(tmp_path / "train.arrow", table.schema) as writer:
        writer.write_table(table)
    Image.new("RGB", (5, 4), (9, 9, 9)).save(tmp_path / "a.png")
    pq.write_table(pa.table({"image": [{"bytes": None, "path": "a.png"}], "label": [1]}), tmp_path / "test.parquet")
    raw = SOURCES["parquet"]({"path": {"train": str(tmp_path / "train.arrow"),
                                       "test": str(tmp_path / "test.parquet")}}, "opts")
    assert raw.classes == ["0", "1"] and raw.train.images.shape == (4, 3, 4, 5) and len(raw.test) == 1
    assert raw.test.images[0, :, 0, 0].tolist() == [9, 9, 9]


def test_parquet_missing_column(tmp_path):
    pq.write_table(image_table(), tmp_path / "t.parquet")
    columns = r"columns: \['img', 'y', 'part'\]"
    with pytest.raises(SpecError, match=rf"^opts\.image_column: column 'image' not in .*{columns}"):
        SOURCES["parquet"]({"path": str(tmp_path / "t.parquet")}, "opts")


# ------------------------------------------------------------------------------------------------------------------
# torchvision
# ------------------------------------------------------------------------------------------------------------------


def test_torchvision_errors(tmp_path):
    with pytest.raises(SpecError, match=r"^opts\.name: unknown torchvision dataset 'CIFAR11'; .*CIFAR10"):
        SOURCES["torchvision"]({"name": "CIFAR11"}, "opts")
    with pytest.raises(SpecError, match=r"^opts\.root: cannot load torchvision MNIST"):
        SOURCES["torchvision"]({"name": "MNIST", "root": str(tmp_path), "download": False}, "opts")


def test_torchvision_and_fashion_on_local_raw_layout(tmp_path):
    rng = np.random.default_rng(0)
    raw_dir = tmp_path / "FashionMNIST" / "raw"
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    tv = SOURCES["torchvision"]({"name": "FashionMNIST", "root": str(tmp_path), "download": False}, "opts")
    fm = SOURCES["fashion_mnist"]({"root": str(tmp_path)}, "opts")
    assert tv.classes == fm.classes == FASHION_MNIST_CLASSES
    assert torch.equal(tv.train.images, fm.train.images) and torch.equal(tv.test.labels, fm.test.labels)
    assert tv.train.images.shape == (40, 1, 28, 28) and len(tv.test) == 20


def test_torchvision_generic_path():
    raw = SOURCES["torchvision"]({"name": "FakeData", "kwargs": {"size": 6, "image_size": [3, 9, 7],
                                                                 "num_classes": 3}}, "opts")
    assert raw.train.images.shape == (6, 3, 9, 7) and raw.test is None
    assert int(raw.train.labels.max()) < len(raw.classes) <= 3


# ------------------------------------------------------------------------------------------------------------------
# Transforms and loader
# ------------------------------------------------------------------------------------------------------------------


MEAN, STD = (0.5, 0.25, 0.0), (0.25, 0.5, 1.0)


def test_transform_eval_exact_values_and_shapes():
    tf = BatchTransform(16, MEAN, STD)
    white = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)
    out = tf(white, train=False)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
    assert torch.equal(out[:, 0], torch.full((2, 16, 16), 2.0)) and torch.equal(out[:, 1], torch.full((2, 16, 16), 1.5))
    assert torch.equal(out[:, 2], torch.ones(2, 16, 16))
    gray = torch.full((3, 1, 8, 8), 51, dtype=torch.uint8)
    up = tf(gray, train=False)
    assert up.shape == (3, 3, 16, 16)
    torch.testing.assert_close(up[:, 0], torch.full((3, 16, 16), (0.2 - 0.5) / 0.25))
    down = BatchTransform(4, MEAN, STD, channels_last=True)(torch.zeros(2, 3, 9, 9, dtype=torch.uint8), train=False)
    assert down.shape == (2, 3, 4, 4) and down.is_contiguous(memory_format=torch.channels_last)


def test_augmentation_changes_train_not_eval():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 12, 12), dtype=np.uint8))
    batch = img.expand(64, -1, -1, -1).contiguous()
    tf = BatchTransform(12, MEAN, STD, AugmentSpec(crop_padding=2, flip=True))
    ref = tf(batch, train=False)
    assert torch.equal(ref, tf(batch, train=False)) and torch.equal(ref[0], ref[63])
    out = tf(batch, train=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert len({o.numpy().tobytes() for o in out}) > 8  # per-sample offsets and flips
    assert torch.equal(out, tf(batch, train=True, generator=torch.Generator().manual_seed(0)))
    flip_only = BatchTransform(12, MEAN, STD, AugmentSpec(crop_padding=0, flip=True))(batch, True)
    flipped = [bool(torch.equal(o, ref[0].flip(-1))) for o in flip_only]
    assert all(f or torch.equal(o, ref[0]) for f, o in zip(flipped, flip_only, strict=True)) and 0 < sum(flipped) < 64
    crop = BatchTransform(12, MEAN, STD, AugmentSpec(crop_padding=1))(batch, True)[:, :, 1:-1, 1:-1]
    assert all(any(torch.equal(c, ref[0, :, 1 + dy:11 + dy, 1 + dx:11 + dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
               for c in crop)


def _reference_autoaugment(aa: BatchedAutoAugment, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """AutoAugment image by image, as torchvision's transform does it, from the same draws (the test's oracle)."""
    policies, space = aa._tv._policies, aa._tv._AUGMENTATION_SPACE
    out = []
    for img, u in zip(images, draws.tolist(), strict=True):
        policy = policies[min(int(u[0] * len(policies)), len(policies) - 1)]
        for slot, (name, prob, bin_) in enumerate(policy):
            if not u[1 + slot] <= prob:
                continue
            values, signed = space[name][0](10, *img.shape[-2:]), space[name][1]
            m = 0.0 if values is None else float(values[bin_])
            m = -m if signed and u[3 + slot] <= 0.5 else m
            img = aa.apply(img, name, m)
        out.append(img)
    return torch.stack(out)


def test_batched_autoaugment_is_torchvisions_per_image_autoaugment():
    """Batched over the images that drew the same op and magnitude, it gives, image for image, what torchvision's
    ops give one image at a time for the same draws; uint8 in, uint8 out, same shape; most images change."""
    aa = BatchedAutoAugment()
    for channels in (3, 1):
        batch = torch.from_numpy(np.random.default_rng(channels).integers(0, 256, (96, channels, 12, 14), np.uint8))
        draws = aa.draw(96, torch.Generator().manual_seed(7))
        plan = aa.plan(draws, 12, 14)
        calls, ops = sum(len(slot) for slot in plan), sum(len(idx) for slot in plan for _, _, idx in slot)
        assert ops > 96 and calls < ops / 2  # one call per group of images, not one per image
        out = aa(batch, torch.Generator().manual_seed(7))
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        assert torch.equal(out, _reference_autoaugment(aa, batch, draws))
        changed = (out != batch).flatten(1).any(1).float().mean().item()
        assert changed > 0.4, changed  # (about 0.59 for RGB and 0.57 for gray images over many draws)


def test_autoaugment_is_reproducible():
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, 1, 10, 10), dtype=np.uint8))
    tf = BatchTransform(10, MEAN, STD, AugmentSpec(crop_padding=0, autoaugment=True))
    state = torch.random.get_rng_state()
    a = tf(batch, train=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)  # drawn from the generator only
    assert a.shape == (8, 3, 10, 10) and a.dtype == torch.float32 and not torch.equal(a, tf(batch, train=False))
    assert torch.equal(a, tf(batch, train=True, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(a, tf(batch, train=True, generator=torch.Generator().manual_seed(6)))


def test_autoaugment_runs_after_the_resize():
    """Resize (bilinear, antialiased) to the input size, round to uint8, AutoAugment there, then normalize: the
    authors' order (their Resize then AutoAugment); the input size, not the stored one, sets e.g. translations."""
    batch = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (16, 3, 20, 24), dtype=np.uint8))
    tf = BatchTransform(8, MEAN, STD, AugmentSpec(crop_padding=0, autoaugment=True))
    got = tf(batch, train=True, generator=torch.Generator().manual_seed(9))
    resized = torch.nn.functional.interpolate(batch.float(), size=(8, 8), mode="bilinear", align_corners=False,
                                              antialias=True).round().clamp(0, 255).to(torch.uint8)
    expected = BatchedAutoAugment()(resized, torch.Generator().manual_seed(9)).float() / 255
    expected = (expected - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert BatchTransform(8, MEAN, STD)(batch, train=True).shape == got.shape


def test_autoaugment_changes_the_artifact_keys_only_when_used():
    assert autoaugment_key(AugmentSpec(autoaugment=True)) == {"autoaugment": AUTOAUGMENT_VERSION}
    assert AUTOAUGMENT_VERSION >= 2 and autoaugment_key(AugmentSpec()) == {} and autoaugment_key(None) == {}


def test_tensor_loader_covers_every_index_once():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    loader = TensorLoader(images, labels, batch_size=4, shuffle=True, seed=1)
    assert len(loader) == 3 and len(TensorLoader(images, labels, 4, True, drop_last=True)) == 2
    orders = []
    for _ in range(2):
        seen = []
        for idx, x, y in loader:
            assert idx.dtype == torch.int64 and torch.equal(y, idx) and torch.equal(x[:, 0, 0, 0].long(), idx)
            seen += idx.tolist()
        assert sorted(seen) == list(range(10))
        orders.append(seen)
    assert orders[0] != orders[1]
    assert [i.tolist() for i, _, _ in TensorLoader(images, labels, 4, True, seed=1)] == [orders[0][:4], orders[0][4:8],
                                                                                         orders[0][8:]]
    assert [i.tolist() for i, _, _ in TensorLoader(images, labels, 4, False)][0] == [0, 1, 2, 3]


@pytest.mark.slow
def test_stream_loader_inside_a_ray_worker(tmp_path):
    """Trials run in Ray worker processes: the streamed loader's DataLoader workers start there and deliver the same
    batches as in this process (a real local Ray cluster)."""
    import ray

    _digit_tree(tmp_path)
    opts = {"root": str(tmp_path), "mode": "L", "stream": True, "workers": 2}

    def batches() -> list[tuple[list[int], int]]:
        raw = SOURCES["folder"](opts, "opts").train
        loader = make_loader(raw.images, raw.labels, 4, True)
        return [(i.tolist(), int(x.sum())) for _ in range(2) for i, x, _ in loader]

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.get(ray.remote(batches).remote(), timeout=300)
    finally:
        ray.shutdown()
    assert remote == batches() and len(remote) == 12


def test_to_device_keeps_a_tensor_already_there():
    """``to_device`` (the non-blocking host-to-GPU copy of a step's indices and random draws) is the identity on the
    tensor's own device; on CUDA it goes through pinned memory (tests/test_device.py, GPU only)."""
    from mlfd.data import to_device

    t = torch.arange(5)
    assert to_device(t, torch.device("cpu")) is t
