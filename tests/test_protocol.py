"""The wire protocol: msgpack headers that round-trip, strict validation, and a real server's answers."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from asyncframes import _protocol as protocol
from asyncframes._process import ServerProcess
from asyncframes._protocol import PROTOCOL_VERSION
from asyncframes._video import Video, VideoInfo
from asyncframes.errors import ProtocolError

MESSAGES = [
    protocol.Hello(version=1, client="test"),
    protocol.Welcome(version=1, server="0.1.0"),
    protocol.Request(request_id=3, video=Video("a.mp4", grayscale=True), frame_idxs=protocol.frame_selection([5, 1, 1]), frames_per_chunk=2, window=3),
    protocol.Request(request_id=4, video=Video("a.mp4"), frame_idxs=None),
    protocol.Request(request_id=5, video=Video("a.mp4"), frame_idxs=protocol.frame_selection(range(9, -1, -3))),
    protocol.Chunk(request_id=3, chunk=0, last_chunk=False, frame_idxs=[5, 1], dtype="|u1", shape=[2, 4, 4, 1]),
    protocol.Error(request_id=None, error="ProtocolError", message="no"),
    protocol.Cancel(request_id=3),
    protocol.Credit(request_id=3, chunks=2),
    protocol.InfoRequest(request_id=9, video=Video("b.mkv")),
    protocol.InfoReply(request_id=9, info=VideoInfo("b.mkv", 10, 4, 6, 3, False, 29.97, "h264", "yuv420p", "matroska,webm")),
    protocol.FrameTimesRequest(request_id=10, video=Video("c.mp4", stream=1)),
    protocol.FrameTimesReply(
        request_id=10, pts_seconds=protocol.times_bytes([0.0, 0.04]), duration_seconds=protocol.times_bytes([0.04, 0.04])
    ),
    protocol.FrameTimesReply(request_id=11, pts_seconds=b"", duration_seconds=b"", num_frames_from_header=7),
    protocol.Ping(request_id=2),
    protocol.Pong(request_id=2, server="0.1.0"),
    protocol.Stop(),
    protocol.Shutdown(reason="terminated"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_kind_round_trips(message):
    header = protocol.encode(message)
    assert isinstance(msgpack.unpackb(header), dict)  # plain msgpack, no pickle
    assert protocol.decode(header) == message


@pytest.mark.parametrize(
    "body, complaint",
    [
        ({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": [1.5]}, "frame_idxs"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": [1, 2]}, "got list"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": b"\x01\x00\x00"}, "multiple of 4"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": {"start": 0, "stop": 9, "step": 0}}, "step"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": {"start": -1, "stop": 9, "step": 1}}, "start"),
        ({"kind": "release", "slots": list(range(1, protocol.MAX_RELEASE_SLOTS + 2))}, "slots"),
        ({"kind": "request", "request_id": "1", "video": {"filename": "a"}, "frame_idxs": None}, "request_id"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a", "evil": 1}, "frame_idxs": None}, "evil"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": None, "frames_per_chunk": 0}, "frames_per_chunk"),
        ({"kind": "credit", "request_id": 1, "chunks": True}, "chunks"),
        ({"kind": "frame_times_reply", "request_id": 1, "pts_seconds": b"\x00" * 12, "duration_seconds": b"\x00" * 12}, "float64"),
        ({"kind": "frame_times_reply", "request_id": 1, "pts_seconds": b"\x00" * 8, "duration_seconds": b""}, "holds 1 times"),
        ({"kind": "frame_times_reply", "request_id": 1, "pts_seconds": [0.0], "duration_seconds": b""}, "pts_seconds"),
        ({"kind": "launch_missiles"}, "unknown message kind"),
        ({"request_id": 1}, "unknown message kind"),
    ],
)
def test_malformed_headers_are_protocol_errors(body, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        protocol.decode(msgpack.packb(body))


def test_non_msgpack_and_non_map_headers_are_refused():
    with pytest.raises(ProtocolError):
        protocol.decode(b"\xc1garbage")
    with pytest.raises(ProtocolError, match="expected a map"):
        protocol.decode(msgpack.packb([1, 2]))


def test_chunk_payload_must_match_its_header():
    frames = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
    header = protocol.chunk_header(1, 0, True, [np.int64(7), 8], frames.shape, frames.dtype)
    assert header.frame_idxs == [7, 8] and header.shape == [2, 3, 4, 1]
    np.testing.assert_array_equal(protocol.chunk_array(header, memoryview(frames.tobytes())), frames)
    with pytest.raises(ProtocolError, match="payload has 23 bytes"):
        protocol.chunk_array(header, memoryview(frames.tobytes()[:-1]))


# -- a raw ZeroMQ peer against a real server ---------------------------------------


@pytest.fixture(scope="module")
def server():
    process = ServerProcess()
    yield process
    process.stop()


@pytest.fixture
def raw(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(server.endpoint)
    yield sock
    sock.close()


def ask(sock, message, expect=None):
    sock.send(protocol.encode(message))
    while True:
        reply, payload = protocol.parse(sock.recv_multipart())
        if not isinstance(reply, protocol.Ping):  # liveness pings may arrive at any time
            return reply, payload


def test_garbage_gets_an_error_and_the_server_keeps_serving(raw, make_clip):
    raw.send(b"\x00\x01 not msgpack")
    reply, _ = protocol.parse(raw.recv_multipart())
    assert isinstance(reply, protocol.Error) and reply.error == "ProtocolError"
    ask(raw, protocol.Hello(version=PROTOCOL_VERSION))
    reply, _ = ask(raw, protocol.InfoRequest(request_id=2, video=Video(str(make_clip("gray.mp4")))))
    assert isinstance(reply, protocol.InfoReply) and reply.info.frame_count == 40


def test_server_validates_indices_itself(raw, make_clip):
    """A client that skips local checks still gets a clear error for a negative index."""
    ask(raw, protocol.Hello(version=PROTOCOL_VERSION))
    video = Video(str(make_clip("gray.mp4")))
    reply, _ = ask(raw, protocol.Request(request_id=5, video=video, frame_idxs=protocol.frame_selection([0, 40])))
    assert isinstance(reply, protocol.Error) and reply.request_id == 5
    assert reply.error == "FrameIndexError" and "frame index 40 is out of range" in reply.message
    reply, _ = ask(raw, protocol.Request(request_id=8, video=video, frame_idxs=protocol.FrameRange(45, -1, -1)))
    assert isinstance(reply, protocol.Error) and "frame index 45 is out of range" in reply.message
    reply, payload = ask(raw, protocol.Request(request_id=6, video=video, frame_idxs=protocol.frame_selection([39, 0]), frames_per_chunk=8))
    assert isinstance(reply, protocol.Chunk) and reply.last_chunk and reply.frame_idxs == [39, 0]
    assert protocol.chunk_array(reply, payload).shape == (2, 96, 128, 1)


# -- limits: decoding is bounded before anything is built -------------------------------


def test_frame_selections_are_compact():
    """Ranges stay ranges and explicit indices are 4 bytes each, never a list of ints."""
    assert protocol.frame_selection(range(0, 10_000_000)) == protocol.FrameRange(0, 10_000_000, 1)
    many = np.arange(1_000_000, dtype=np.int64)[::-1]
    selection = protocol.frame_selection(many)
    assert isinstance(selection, bytes) and len(selection) == 4 * many.size
    header = protocol.encode(protocol.Request(request_id=1, video=Video("a.mp4"), frame_idxs=selection))
    assert len(header) < 4 * many.size + 200 and protocol.count_values(header, 100) < 30
    back = protocol.decode(header, max_bin_len=len(selection))
    idxs = protocol.selection_indices(back.frame_idxs, 0)
    assert isinstance(idxs, np.ndarray) and idxs.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(idxs, many)
    assert protocol.selection_count(back.frame_idxs) == many.size
    with pytest.raises(ValueError, match="integers in 0"):
        protocol.frame_selection([1, -2])


@pytest.mark.parametrize(
    "header, complaint",
    [
        # a million empty lists in 1 MB: would be a million Python objects
        (msgpack.packb({"kind": "release", "slots": [[]] * 1_000_000}), "more than"),
        (b"\x91" * 1_000_000 + b"\xc0", "more than"),  # nesting a million deep
        (msgpack.packb({"kind": "hello", "version": 3, "client": "x" * (protocol.MAX_STR_BYTES + 1)}), "size limit"),
        (msgpack.packb({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": bytes(1 << 20)}), "size limit"),
        (msgpack.packb({"kind": "ping", **{str(i): 0 for i in range(100)}}), "size limit"),
        (b"\xc6\xff\xff\xff\xff", "not msgpack"),  # announces a 4 GiB bytes value it does not hold
        (b"\xdd\xff\xff\xff\xff", "not msgpack"),  # announces 4 billion list items it does not hold
    ],
    ids=["many-values", "deep", "long-string", "big-bin", "wide-map", "truncated-bin", "huge-array"],
)
def test_decode_refuses_oversized_input_before_building_it(header, complaint):
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=complaint):
            protocol.decode(header, max_values=protocol.MAX_CLIENT_HEADER_VALUES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding a refused header allocated {peak} bytes"


def test_a_server_refuses_client_messages_with_more_than_one_part():
    parts = [protocol.encode(protocol.Ping(request_id=1)), b"x" * 100]
    with pytest.raises(ProtocolError, match="expected 1 part, got 2"):
        protocol.parse(parts, max_parts=1)
    assert isinstance(protocol.parse(parts[:1], max_parts=1)[0], protocol.Ping)


def test_the_server_message_size_limit_follows_its_request_limit():
    from asyncframes._transport import MAX_MESSAGE_BYTES

    legal = protocol.encode(
        protocol.Request(request_id=1, video=Video("v" * 4096), frame_idxs=protocol.frame_selection(np.zeros(10_000_000, np.uint32)))
    )
    assert len(legal) <= MAX_MESSAGE_BYTES == protocol.max_header_bytes(10_000_000) < 48 * 2**20


def test_a_frame_times_reply_for_a_long_video_fits_what_a_client_accepts():
    times = np.arange(1_000_000) / 30.0  # 9 hours at 30 fps: 8 MB per array
    reply = protocol.FrameTimesReply(request_id=1, pts_seconds=protocol.times_bytes(times), duration_seconds=protocol.times_bytes(times))
    header = protocol.encode(reply)
    with pytest.raises(ProtocolError, match="size limit"):
        protocol.decode(header)  # the default limit is for client messages
    decoded = protocol.decode(header, max_bin_len=protocol.MAX_REPLY_BIN_BYTES)
    assert isinstance(decoded, protocol.FrameTimesReply)
    np.testing.assert_array_equal(protocol.times_array(decoded.pts_seconds), times)
