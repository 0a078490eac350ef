"""The wire protocol: msgpack headers that round-trip, strict validation, and a real server's answers."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from asyncframes import protocol
from asyncframes.errors import ProtocolError
from asyncframes.process import ServerProcess
from asyncframes.protocol import PROTOCOL_VERSION
from asyncframes.video import Video, VideoInfo

MESSAGES = [
    protocol.Hello(version=1, client="test"),
    protocol.Welcome(version=1, server="0.1.0"),
    protocol.Request(request_id=3, video=Video("a.mp4", grayscale=True), frame_idxs=[5, 1, 1], frames_per_chunk=2, window=3),
    protocol.Request(request_id=4, video=Video("a.mp4"), frame_idxs=None),
    protocol.Chunk(request_id=3, chunk=0, last_chunk=False, frame_idxs=[5, 1], dtype="|u1", shape=[2, 4, 4, 1]),
    protocol.Error(request_id=None, error="ProtocolError", message="no"),
    protocol.Cancel(request_id=3),
    protocol.Credit(request_id=3, chunks=2),
    protocol.InfoRequest(request_id=9, video=Video("b.mkv")),
    protocol.InfoReply(request_id=9, info=VideoInfo("b.mkv", 10, 4, 6, 3, False, 29.97, "h264", "yuv420p", "matroska,webm")),
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
        ({"kind": "request", "request_id": "1", "video": {"filename": "a"}, "frame_idxs": None}, "request_id"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a", "evil": 1}, "frame_idxs": None}, "evil"),
        ({"kind": "request", "request_id": 1, "video": {"filename": "a"}, "frame_idxs": None, "frames_per_chunk": 0}, "frames_per_chunk"),
        ({"kind": "credit", "request_id": 1, "chunks": True}, "chunks"),
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
    header = protocol.chunk_header(1, 0, True, [np.int64(7), 8], frames)
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
        if not isinstance(reply, protocol.Ping):  # liveness probes may arrive at any time
            return reply, payload


def test_handshake_checks_the_protocol_version(raw):
    reply, _ = ask(raw, protocol.Hello(version=PROTOCOL_VERSION + 1))
    assert isinstance(reply, protocol.Error) and reply.error == "ProtocolError"
    assert f"version {PROTOCOL_VERSION + 1} is not supported" in reply.message
    reply, _ = ask(raw, protocol.Hello(version=PROTOCOL_VERSION))
    assert isinstance(reply, protocol.Welcome) and reply.version == PROTOCOL_VERSION


def test_requests_before_hello_are_refused(raw):
    reply, _ = ask(raw, protocol.InfoRequest(request_id=1, video=Video("x.mp4")))
    assert isinstance(reply, protocol.Error) and "hello" in reply.message


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
    reply, _ = ask(raw, protocol.Request(request_id=5, video=video, frame_idxs=[0, -3]))
    assert isinstance(reply, protocol.Error) and reply.request_id == 5
    assert reply.error == "FrameIndexError" and "negative" in reply.message
    reply, payload = ask(raw, protocol.Request(request_id=6, video=video, frame_idxs=[39, 0], frames_per_chunk=8))
    assert isinstance(reply, protocol.Chunk) and reply.last_chunk and reply.frame_idxs == [39, 0]
    assert protocol.chunk_array(reply, payload).shape == (2, 96, 128, 1)


def test_credit_limits_chunks_in_flight(raw, make_clip):
    ask(raw, protocol.Hello(version=PROTOCOL_VERSION))
    video = Video(str(make_clip("gray.mp4")))
    raw.send(protocol.encode(protocol.Request(request_id=7, video=video, frame_idxs=None, frames_per_chunk=4, window=2)))
    got = []
    while len(got) < 2:
        reply, _ = protocol.parse(raw.recv_multipart())
        if isinstance(reply, protocol.Chunk):
            got.append(reply.chunk)
    assert not raw.poll(500), "server sent a third chunk without credit"
    raw.send(protocol.encode(protocol.Credit(request_id=7, chunks=1)))
    assert raw.poll(5000)
    reply, _ = protocol.parse(raw.recv_multipart())
    assert isinstance(reply, protocol.Chunk) and reply.chunk == 2
    raw.send(protocol.encode(protocol.Cancel(request_id=7)))
