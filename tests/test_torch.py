"""asyncframes.torch with a real DataLoader: 0 and 2 workers, fork and spawn, pinned memory; exact frames."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra: pip install 'asyncframes-video[torch]'")

from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from asyncframes.torch import ClipsDataset, ClipsMapDataset, FramesDataset  # noqa: E402

from .conftest import reference_frames  # noqa: E402


@pytest.fixture(scope="module")
def videos(make_clip):
    return [str(make_clip("h264_gops.mp4")), str(make_clip("h264.mkv"))]  # 150 and 80 frames


def expected(path: str, i: int, layout: str = "HWC") -> np.ndarray:
    frame = reference_frames(path)[i]
    return frame.transpose(2, 0, 1) if layout == "CHW" else frame


def check_batches(loader, layout: str = "HWC") -> Counter:
    """Every frame of every batch equals the sequential decode; how often each (video, index) came."""
    seen: Counter = Counter()
    for batch in loader:
        assert batch["frame"].dtype == torch.uint8
        for frame, i, video in zip(batch["frame"], batch["frame_index"].tolist(), batch["video"]):
            assert np.array_equal(frame.numpy(), expected(video, i, layout)), f"{video}: frame {i}"
            seen[(video, i)] += 1
    return seen


@pytest.mark.parametrize(
    "workers, context, pin",
    [(0, None, False), (2, "fork", True), (2, "spawn", False)],
    ids=["main-process", "2-workers-fork-pinned", "2-workers-spawn"],
)
def test_every_frame_once_through_a_dataloader(videos, workers, context, pin):
    ds = FramesDataset(videos, layout="CHW", shuffle=True, seed=1)
    if workers:  # used in the parent first: a forked worker must not use the parent's client
        assert next(iter(ds))["frame"].shape == (3, 96, 128)
    loader = DataLoader(ds, batch_size=16, num_workers=workers, multiprocessing_context=context, pin_memory=pin,
                        persistent_workers=False)
    seen = check_batches(loader, "CHW")
    assert seen == Counter({(v, i): 1 for v in videos for i in range(len(reference_frames(v)))})
    assert check_batches(loader, "CHW") == seen  # a second epoch, new workers
    ds.close()


def test_ranks_share_the_epochs_order_and_split_it(videos):
    ranks = [FramesDataset(videos[0], range(0, 150, 2), shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    for ds in ranks:
        ds.set_epoch(3)
    epoch3 = [[item["frame_index"] for item in ds] for ds in ranks]
    assert sorted(epoch3[0] + epoch3[1]) == list(range(0, 150, 2)) and not set(epoch3[0]) & set(epoch3[1])
    ranks[0].set_epoch(4)
    assert [item["frame_index"] for item in ranks[0]] != epoch3[0]  # a new order, the same split rule
    for ds in ranks:
        ds.close()


def test_a_used_dataset_pickles_without_its_client(videos):
    ds = FramesDataset(videos[1], [3, 1, 2])
    assert [item["frame_index"] for item in ds] == [3, 1, 2]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._client is None and [item["frame_index"] for item in copy] == [3, 1, 2]
    ds.close()
    copy.close()


def test_clips_through_workers_and_by_random_sampling(videos):
    clips = ClipsDataset(videos, frames_per_clip=4, stride=2, clip_step=20)
    loader = DataLoader(clips, batch_size=3, num_workers=2, multiprocessing_context="fork")
    got = []
    for batch in loader:
        assert batch["frames"].shape[1:] == (4, 96, 128, 3)
        for frames, idxs, video in zip(batch["frames"], batch["frame_indices"], batch["video"]):
            assert idxs.tolist() == list(range(idxs[0], idxs[0] + 8, 2))
            for frame, i in zip(frames, idxs.tolist()):
                assert np.array_equal(frame.numpy(), expected(video, i))
            got.append((video, idxs[0].item()))
    # 150 frames: starts 0..140 step 20 that fit a span of 7 -> 8 clips; 80 frames: 0..60 -> 4 clips
    assert sorted(got) == sorted([(videos[0], s) for s in range(0, 144, 20)] + [(videos[1], s) for s in range(0, 74, 20)])

    table = ClipsMapDataset(videos, [(0, [5, 6, 7]), (videos[1], [79, 0, 40])], layout="CHW")
    assert len(table) == 2
    sampled = DataLoader(table, batch_size=1, sampler=RandomSampler(table, num_samples=6, replacement=True),
                         num_workers=2, multiprocessing_context="spawn")
    for batch in sampled:
        frames, idxs, video = batch["frames"][0], batch["frame_indices"][0].tolist(), batch["video"][0]
        assert frames.shape == (3, 3, 96, 128)
        assert all(np.array_equal(f.numpy(), expected(video, i, "CHW")) for f, i in zip(frames, idxs))
    with pytest.raises(IndexError, match="clip 2 out of range: there are 2 clips"):
        table[2]
    table.close()


def test_bad_arguments_are_named(videos):
    with pytest.raises(ValueError, match="layout must be one of"):
        FramesDataset(videos, layout="NCHW")
    with pytest.raises(ValueError, match="2 selections for 1 videos"):
        FramesDataset(videos[0], [[1], [2]])
    with pytest.raises(ValueError, match="not one of the videos"):
        ClipsDataset(videos[0], [("other.mp4", [0])])


def test_persistent_workers_reshuffle_each_epoch(videos):
    ds = FramesDataset(videos[1], shuffle=True, seed=2)
    loader = DataLoader(ds, batch_size=10, num_workers=2, multiprocessing_context="fork", persistent_workers=True)
    orders = []
    for epoch in range(2):
        ds.set_epoch(epoch)  # the workers cannot hear this: they count epochs themselves
        seen = [i for batch in loader for i in batch["frame_index"].tolist()]
        assert sorted(seen) == list(range(80))
        orders.append(seen)
    assert orders[0] != orders[1]
    del loader
    ds.close()
