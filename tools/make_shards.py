"""Write Fashion-MNIST as webdataset shards: ``png`` (28x28 grey), ``txt`` (prompt), ``cls`` (label).

    python tools/make_shards.py --split train --out shards/fmnist-train --maxcount 10000
    python tools/make_shards.py --clips my_clips/ --out shards/clips --maxcount 1000   # (mp4, txt) for video

``--clips`` packs a clip folder (mp4 files + metadata.jsonl) instead, for ``data.source: video_webdataset``.

Read them back with
``wds.WebDataset(urls, shardshuffle=False).decode("torchrgb").to_tuple("png", "txt", "cls")``.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tsm_core.data import fmnist


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) grey image as PNG (lossless, so shards round-trip exactly)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out: str | Path, split: str = "train", root: str | Path | None = None,
                 limit: int | None = None, maxcount: int = 10000) -> list[Path]:
    """Write ``split`` (the first ``limit`` images, or all) to ``out-000000.tar``, ...; return the files.

    Sample ``i`` has key ``{split}-{i:06d}`` and prompt template ``i % len(TEMPLATES)``, the same
    prompt ``fmnist.FashionMNIST(split)[i]`` gives.
    """
    import webdataset as wds

    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    images, labels = fmnist.load_fashion_mnist(split, root)
    n = len(labels) if limit is None else min(limit, len(labels))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pattern = f"{out}-%06d.tar"
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for i in range(n):
            label = int(labels[i])
            sink.write({"__key__": f"{split}-{i:06d}", "png": png_bytes(images[i]),
                        "txt": fmnist.prompt_for(label, template=i), "cls": label})
        shards = sink.shard
    return [Path(pattern % k) for k in range(shards)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="shard prefix; files are PREFIX-000000.tar, ...")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--data-root", default=None, help=f"Fashion-MNIST folder (default ${fmnist.ENV_VAR} "
                                                     f"or {fmnist.DEFAULT_DIR})")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT images")
    p.add_argument("--maxcount", type=int, default=10000, help="images (or clips) per shard")
    p.add_argument("--clips", default=None, help="a clip folder with metadata.jsonl to pack instead of Fashion-MNIST")
    args = p.parse_args(argv)
    if args.clips is not None:
        from tsm_core.data.video import write_clip_shards

        files = write_clip_shards(args.clips, args.out, args.maxcount)
    else:
        files = write_shards(args.out, args.split, args.data_root, args.limit, args.maxcount)
    print(f"wrote {len(files)} shard(s): {', '.join(str(f) for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
