"""A PyTorch DataLoader over exact video frames, decoded by frame servers in the background.

    python examples/train_loader.py [VIDEO ...] [--workers 2] [--epochs 2]

Without videos it uses the built-in sample clip. Each DataLoader worker makes its own
client (and private frame server) on first use; the frames are sharded over the workers
(and over ranks under torchrun or srun), each exactly once per epoch, reshuffled per epoch.
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import DataLoader

from asyncframes._sample import sample_video
from asyncframes.torch import FramesDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    videos = args.videos or [str(sample_video())]
    dataset = FramesDataset(videos, layout="CHW", shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        multiprocessing_context="spawn" if args.workers else None)
    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)  # a new order each epoch, the same on every rank
        start, frames = time.perf_counter(), 0
        for batch in loader:
            images = batch["frame"].float() / 255  # (batch, 3, h, w): your model goes here
            frames += len(images)
        took = time.perf_counter() - start
        print(f"epoch {epoch}: {frames} frames in {took:.2f} s ({frames / took:.0f} frames/s), last batch {tuple(images.shape)}")
    dataset.close()


if __name__ == "__main__":
    main()
