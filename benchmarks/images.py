"""Image encoder throughput: recengine's `images` encoder (plugins/recengine-images) against the
model's own forward pass.

--n generated pictures (--size pixels square, JPEG: shapes and noise, each its own) and a CLIP model of
ViT-B/32's size (the default `CLIPConfig()`, randomly initialised: weights do not change the speed)
saved to a temporary folder with its image processor; or --model, a local CLIP/SigLIP folder. Rows:

- the floor: `model.get_image_features` on pixel tensors made beforehand, in batches of the encoder's
  batch size; no encoder that runs this model can beat it;
- decoding and preprocessing alone, in the encoder's thread pool (what the forward pass waits for);
- recengine's `images` encoder end to end (decode, preprocess, forward, normalise) into an empty cache,
  with the model already loaded;
- the re-run from the cache: a fresh encoder and cache object, so a stat per file and the shards read.

Images/s are the median of --repeats; the ratio is to the forward pass.

    .venv/bin/python benchmarks/images.py [--n 512] [--size 224] [--repeats 3] [--device auto] [--batch-size N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from recengine.parts.encoders import EmbeddingCache, create_encoder, embed


def pictures(folder: Path, n: int, size: int) -> list[str]:
    """`n` JPEGs of `size` x `size`: a noisy background and a few shapes, each from its own seed."""
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 4 + rng.integers(0, 192, 3, dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, size, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / f"{i:06d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def vit_b32(folder: Path) -> Path:
    """A randomly initialised CLIP of ViT-B/32's shape and its default image processor, saved as a model folder."""
    import transformers
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).eval().save_pretrained(folder)
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor().save_pretrained(folder)
    return folder


def median_seconds(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="images per run")
    parser.add_argument("--size", type=int, default=224, help="pixels per side of the generated images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="the encoder's batch size [default: its own]")
    parser.add_argument("--model", default=None, help="a local CLIP/SigLIP folder [default: a random ViT-B/32-sized CLIP]")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "images").mkdir()
        paths = pictures(root / "images", args.n, args.size)
        model = args.model or str(vit_b32(root / "model"))
        params = {"model": model, "device": args.device, **({"batch_size": args.batch_size} if args.batch_size else {})}
        encoder = create_encoder("images", params)
        encoder.encode(paths[:8])  # warm-up: model load, kernels, allocator
        device, size = encoder.device, encoder.batch_size

        # The floor: the forward pass alone, on the processor's tensors made beforehand.
        pixels = [torch.cat([encoder._prepare(p)["pixel_values"] for p in paths[s : s + size]]) for s in range(0, len(paths), size)]

        def forward() -> None:
            with torch.inference_mode(), encoder._autocast():
                for batch in pixels:
                    encoder._model.get_image_features(pixel_values=batch.to(device))

        def decode() -> None:
            with ThreadPoolExecutor(encoder.threads) as pool:
                list(pool.map(encoder._prepare, paths))

        def end_to_end() -> None:
            with tempfile.TemporaryDirectory() as cache:
                embed(paths, encoder, EmbeddingCache(Path(cache)))

        floor = median_seconds(forward, args.repeats)
        decoding = median_seconds(decode, args.repeats)
        ours = median_seconds(end_to_end, args.repeats)
        cache = EmbeddingCache(root / "cache")
        embed(paths, encoder, cache)

        def rerun() -> None:
            _, stats = embed(paths, create_encoder("images", params), EmbeddingCache(root / "cache"))
            assert stats.misses == 0, stats

        again = median_seconds(rerun, args.repeats)

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"\n{args.n} images of {args.size}x{args.size} (JPEG), model {Path(model).name if args.model else 'random CLIP ViT-B/32'}, "
          f"device {device} ({name}), precision {encoder.precision}, batch {size}, torch {torch.__version__}, "
          f"CPU threads {torch.get_num_threads()}, decode threads {encoder.threads}, median of {args.repeats}")
    print(f"{'method':52} {'images/s':>10} {'vs forward':>11} {'seconds':>9}")
    for label, seconds in [("model forward alone, pixels made beforehand (floor)", floor),
                           ("decode + preprocess alone (thread pool)", decoding),
                           ("recengine images, end to end, empty cache", ours),
                           ("recengine images, re-run from the cache", again)]:
        rate = args.n / seconds
        print(f"{label:52} {rate:10.1f} {rate / (args.n / floor):10.2f}x {seconds:9.3f}")


if __name__ == "__main__":
    main()
