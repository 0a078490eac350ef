"""asyncframes.ray.read_frames on a real local Ray runtime: exact frames, each once, split by GOP."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'asyncframes-video[ray]'")

from asyncframes.errors import FrameIndexError  # noqa: E402
from asyncframes.ray import FramesDatasource, read_frames  # noqa: E402

from .conftest import reference_frames, shared_video, shuffled_with_duplicates  # noqa: E402

VIDEOS = ["h264_gops.mp4", "h264.mkv", "h264.ts", "vp9.webm", "h264_vfr.mp4"]


@pytest.fixture(scope="module")
def runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR", labels={"storage": "local"})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def paths(make_clip):
    return [str(make_clip(name)) for name in VIDEOS]


def times(path: str) -> list[float]:
    import av

    with av.open(path) as container:
        return [float(frame.time) for frame in container.decode(video=0)]


def check_rows(rows: list[dict], asked: dict[str, list[int]]) -> None:
    """Every asked frame comes back exactly once (duplicates as often as asked), with the pixels and time of a sequential decode."""
    got = {p: Counter() for p in asked}
    for row in rows:
        path, i = row["video"], int(row["frame_index"])
        got[path][i] += 1
        expected = reference_frames(path)[i]
        expected = expected if row["frame"].shape[-1] == 3 else expected[..., :1]  # grayscale: detected or asked
        assert np.array_equal(row["frame"], expected), f"{path}: frame {i} differs from a sequential decode"
        assert row["pts_seconds"] == pytest.approx(times(path)[i], abs=1e-9), f"{path}: frame {i}'s time"
    assert got == {p: Counter(idxs) for p, idxs in asked.items()}


def test_every_frame_of_several_videos_exactly_once_split_into_gop_tasks(runtime, paths):
    # One 150-frame video with 6 GOPs spreads over several tasks; no GOP is decoded by two.
    tasks = FramesDatasource(paths[:1]).get_read_tasks(4)
    assert len(tasks) >= 2
    assert sum(t.metadata.num_rows for t in tasks) == 150
    ds = read_frames(paths, override_num_blocks=6)
    check_rows(ds.take_all(), {p: list(range(len(reference_frames(p)))) for p in paths})


def test_chosen_frames_in_any_order_with_duplicates(runtime, paths):
    asked = {p: shuffled_with_duplicates(len(reference_frames(p)), 15, seed=k)[:40] for k, p in enumerate(paths)}
    ds = read_frames(list(asked), [asked[p] for p in asked], frames_per_block=8)
    check_rows(ds.take_all(), asked)


def test_a_real_recording_with_b_frames_and_an_edit_list(runtime):
    path = str(shared_video("centered_pair_small.mp4"))  # grayscale content: (h, w, 1) frames, detected
    asked = list(range(140, 160)) + list(range(1090, 1100)) + [0, 500]  # across keyframes, the end, the start
    rows = read_frames(path, asked).take_all()
    assert rows[0]["frame"].shape == (384, 384, 1)
    check_rows(rows, {path: asked})


def test_the_driver_resolves_grayscale_so_read_tasks_need_not_detect_it(paths):
    gray = FramesDatasource._plan(str(shared_video("centered_pair_small.mp4")))
    colour = FramesDatasource._plan(paths[0])
    assert gray.video.grayscale is True and gray.shape == (384, 384, 1)
    assert colour.video.grayscale is False and colour.shape[-1] == 3


def test_clips_come_whole_one_row_each(runtime, paths):
    clips = [(0, [10, 11, 12, 13]), (paths[1], [70, 72, 74, 76]), (0, [149, 0, 75, 75]), (2, list(range(20, 28)))]
    rows = sorted(read_frames(paths, clips=clips, override_num_blocks=3).take_all(), key=lambda r: r["clip"])
    assert [int(r["clip"]) for r in rows] == [0, 1, 2, 3]
    for row, (video, idxs) in zip(rows, clips):
        path = paths[video] if isinstance(video, int) else video
        assert row["video"] == path and list(row["frame_indices"]) == idxs
        assert row["frames"].shape == (len(idxs), 96, 128, 3)
        for frame, i, t in zip(row["frames"], idxs, row["pts_seconds"]):
            assert np.array_equal(frame, reference_frames(path)[i]) and t == pytest.approx(times(path)[i], abs=1e-9)
    with pytest.raises(ValueError, match="not one of the videos"):
        read_frames(paths[:1], clips=[("elsewhere.mp4", [0])])


def test_transforms_apply_in_read_tasks(runtime, paths):
    import av

    from asyncframes import Video

    video = Video(paths[0], grayscale=False, resize=(48, 64), layout="CHW")
    rows = read_frames(video, [0, 77]).take_all()
    with av.open(paths[0]) as container:
        frames = list(container.decode(video=0))
    for row in rows:
        expected = frames[row["frame_index"]].reformat(width=64, height=48, format="rgb24", interpolation="BILINEAR")
        assert np.array_equal(row["frame"], expected.to_ndarray().transpose(2, 0, 1))
        assert row["video"] == paths[0]


def test_an_index_outside_the_video_is_refused_naming_it(runtime, paths):
    with pytest.raises(FrameIndexError, match="150"):
        read_frames(paths[0], [3, 150])


def test_map_batches_torch_batches_and_streaming_split(runtime, paths):
    path = paths[0]
    ds = read_frames(path, list(range(0, 150, 3)))
    means = ds.map_batches(lambda b: {"frame_index": b["frame_index"], "mean": b["frame"].mean(axis=(1, 2, 3))}).take_all()
    assert sorted(r["frame_index"] for r in means) == list(range(0, 150, 3))
    assert all(r["mean"] == pytest.approx(reference_frames(path)[r["frame_index"]].mean()) for r in means)
    seen = []
    for batch in ds.select_columns(["frame", "frame_index"]).iter_torch_batches(batch_size=16):  # tensors: no strings
        assert tuple(batch["frame"].shape[1:]) == (96, 128, 3)
        for i, frame in zip(batch["frame_index"].tolist(), batch["frame"].numpy()):
            assert np.array_equal(frame, reference_frames(path)[i])
            seen.append(i)
    assert sorted(seen) == list(range(0, 150, 3))
    left, right = ds.streaming_split(2, equal=False)

    @ray.remote
    def consume(it) -> list[int]:
        return [int(i) for batch in it.iter_batches(batch_size=8) for i in batch["frame_index"]]

    # num_cpus=0: the consumers must leave the 2 CPUs to the read tasks that feed them
    split_rows = ray.get([consume.options(num_cpus=0).remote(it) for it in (left, right)], timeout=120)
    assert sorted(split_rows[0] + split_rows[1]) == list(range(0, 150, 3))


def test_frame_servers_as_actors_serve_exact_frames_each_video_from_its_server(runtime, paths):
    from asyncframes.ray import FrameServers

    with FrameServers(num_servers=2) as servers:
        assert len(set(servers.endpoints)) == 2
        for path in paths[:3]:
            assert servers.server_for(path) == servers.server_for(path)  # the same video, the same server
            got = [(i, f) for idxs, frames in servers.read(path, frames_per_chunk=16) for i, f in zip(idxs, frames)]
            assert [i for i, _ in got] == list(range(len(reference_frames(path))))
            assert all(np.array_equal(f, reference_frames(path)[i]) for i, f in got)


def test_a_server_actor_killed_mid_stream_is_restarted_and_the_read_finishes_exactly(runtime, paths):
    from asyncframes.ray import FrameServers

    path = paths[0]
    asked = shuffled_with_duplicates(150, 30, seed=3)
    with FrameServers(num_servers=1) as servers:
        before = servers.pids()
        got: list[int] = []
        for k, (idxs, frames) in enumerate(servers.read(path, asked, frames_per_chunk=8)):
            if k == 2:
                servers.kill(0)  # as a crash would: Ray restarts it, on a new port
            for i, frame in zip(idxs, frames):
                assert np.array_equal(frame, reference_frames(path)[i])
            got += idxs
        assert got == asked
        assert servers.pids() != before


def test_servers_are_placed_by_node_labels_and_unknown_labels_are_refused_naming_those_there(runtime, paths):
    from asyncframes.ray import FrameServers

    with FrameServers(labels={"storage": "local"}) as servers:  # one per node with the label: this one
        assert len(servers.endpoints) == 1
        ((idxs, frames),) = list(servers.read(paths[0], [5, 1], frames_per_chunk=8))
        assert idxs == [5, 1] and all(np.array_equal(f, reference_frames(paths[0])[i]) for i, f in zip(idxs, frames))
    with pytest.raises(ValueError, match="storage=local"):
        FrameServers(labels={"storage": "tape"})


def test_named_servers_are_found_through_ray_from_another_process(runtime, paths):
    from asyncframes.ray import FrameServers

    @ray.remote(num_cpus=0)
    def read_elsewhere(path: str, idxs: list[int]):
        from asyncframes.ray import FrameServers

        with FrameServers.connect("test-discovery") as found:  # leaves them running
            chunks = [(i, f) for got, frames in found.read(path, idxs, frames_per_chunk=4) for i, f in zip(got, frames)]
            return found.endpoints, chunks

    asked = shuffled_with_duplicates(150, 20, seed=5)
    with FrameServers(num_servers=2, name="test-discovery") as servers:
        endpoints, chunks = ray.get(read_elsewhere.remote(paths[0], asked), timeout=120)
        assert endpoints == servers.endpoints
        assert [i for i, _ in chunks] == asked
        assert all(np.array_equal(f, reference_frames(paths[0])[i]) for i, f in chunks)
        assert servers.pids()  # still running after the other process let go
    with pytest.raises(ValueError, match="no frame servers named 'test-discovery'"):
        FrameServers.connect("test-discovery")


def test_an_async_video_on_the_servers_follows_a_restarted_one_and_fails_over_mid_stream(runtime, paths):
    from asyncframes.ray import FrameServers

    path = paths[0]
    ref = reference_frames(path)
    asked = shuffled_with_duplicates(150, 150, seed=8)
    with FrameServers(num_servers=2) as servers, servers.client(timeout=30) as av:
        before = servers.pids()
        got: list[int] = []
        av.load_by_chunk(path, asked, frames_per_chunk=4)
        for k, (idxs, frames) in enumerate(av.chunks):
            if k == 3:
                servers.kill(0)  # mid-stream: the other server takes over its frames
            assert all(np.array_equal(f, ref[i]) for i, f in zip(idxs, frames))
            got += idxs
        assert got == asked
        after = servers.pids()  # waits for Ray to restart it
        assert after[0] != before[0] and after[1] == before[1]
        endpoints = [ray.get(a.endpoint.remote()) for a in servers._actors]
        assert endpoints == servers.endpoints  # restarted on its port: the same endpoint
        servers.kill(1)  # now the other one, while idle
        assert servers.pids()[1] != before[1]
        for _ in range(2):  # both servers again, as the same AsyncVideo
            av.load_by_chunk(path, asked[:40], frames_per_chunk=4)
            got = [(i, f) for idxs, frames in av.chunks for i, f in zip(idxs, frames)]
            assert [i for i, _ in got] == asked[:40] and all(np.array_equal(f, ref[i]) for i, f in got)
