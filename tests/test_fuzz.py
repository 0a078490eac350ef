"""Fuzz the wire protocol against a real standalone server (hypothesis, bounded examples).

Every example opens a fresh raw DEALER, optionally says hello, sends one message
(arbitrary bytes, arbitrary msgpack, a mutated real message, or a wrong number of
frames) and then a sentinel ``ping``; the replies before the sentinel's ``pong``
are the server's answer to that message. Properties:

* a malformed message (one :func:`asyncframes._protocol.parse` refuses) gets exactly
  one ``error`` reply with ``error == "ProtocolError"`` and no request id;
* a well-formed but wrong message gets the answer the protocol defines for it
  (an error naming a class in :mod:`asyncframes.errors`, or the defined reply);
* every reply is itself a well-formed message, and every chunk holds exact frames;
* the server process is alive after every example and answers within a bound;
* afterwards a good :class:`~asyncframes.AsyncVideo` streams a clip exactly.

Valid messages are built with :func:`asyncframes._protocol.encode` from the real
classes, so the fuzz follows changes of their wire layout.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from asyncframes import AsyncVideo
from asyncframes import _protocol as protocol
from asyncframes._convert import luma
from asyncframes._protocol import PROTOCOL_VERSION
from asyncframes._video import Video
from asyncframes.errors import WIRE_ERRORS, ProtocolError

from .conftest import assert_frames_exact, reference_frames, shuffled_with_duplicates
from .test_standalone_server import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX processes and loopback tcp")

#: Seconds the server has to answer one example (it answers in milliseconds; this is a hang).
REPLY_WITHIN_S = 15.0
#: The request id of the ping that closes every example's exchange.
SENTINEL = 987_654_321
#: Examples per property: together the file runs in well under a minute on a loaded 2-core machine.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

CLIP = "clip.mp4"


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory, make_clip) -> Path:
    root = tmp_path_factory.mktemp("fuzz-root")
    shutil.copy(make_clip("h264_gops.mp4"), root / CLIP)
    (root / "sub").mkdir()
    (root / "notes.txt").write_text("not a video\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fuzz_root: Path):
    srv = Server(tmp_path_factory.mktemp("fuzz-log"), "--root", str(fuzz_root), "--log-level", "WARNING")
    yield srv
    code = srv.stop()
    assert code == 0, f"the server did not exit cleanly ({code}):\n{srv.log[-4000:]}"


# -- one exchange ----------------------------------------------------------------


class Exchange:
    """One fuzz client: a fresh DEALER, an optional hello, one message, then the sentinel ping."""

    def __init__(self, server: Server, greet: bool) -> None:
        server.assert_alive()
        self.server = server
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(server.endpoint)
        self.greeted = greet
        if greet:
            self.sock.send(protocol.encode(protocol.Hello(version=PROTOCOL_VERSION, client="fuzz")))
            welcome = self.next_message()
            assert isinstance(welcome[0], protocol.Welcome), welcome

    def next_message(self, deadline: Optional[float] = None) -> tuple[protocol.Message, Optional[memoryview]]:
        deadline = deadline or time.monotonic() + REPLY_WITHIN_S
        while not self.sock.poll(100):  # a dead server fails the example at once, not after the deadline
            self.server.assert_alive()
            assert time.monotonic() < deadline, f"the server sent nothing within {REPLY_WITHIN_S} s"
        frames = self.sock.recv_multipart()
        try:
            return protocol.parse(frames)
        except ProtocolError as exc:
            raise AssertionError(f"the server sent a malformed message {frames!r}: {exc}") from exc

    def send(self, frames: Sequence[bytes], wait_for_request: Optional[int] = None) -> list[tuple[Any, Any]]:
        """Send ``frames`` and the sentinel; every message before its pong (and, for an accepted
        request ``wait_for_request``, until its first chunk or error)."""
        self.sock.send_multipart(list(frames))
        self.sock.send(protocol.encode(protocol.Ping(request_id=SENTINEL)))
        deadline = time.monotonic() + REPLY_WITHIN_S
        replies: list[tuple[Any, Any]] = []
        sentinel = False
        while not sentinel or (wait_for_request is not None and not _answered(replies, wait_for_request)):
            message, payload = self.next_message(deadline)
            if isinstance(message, protocol.Pong) and message.request_id == SENTINEL and not sentinel:
                sentinel = True
                continue
            if isinstance(message, protocol.Ping):  # the server's liveness ping: clients ignore it
                continue
            replies.append((message, None if payload is None else bytes(payload)))
        return replies

    def close(self) -> None:
        self.sock.close(linger=0)


def _answered(replies: list[tuple[Any, Any]], request_id: int) -> bool:
    return any(isinstance(m, (protocol.Chunk, protocol.Error)) and m.request_id == request_id for m, _ in replies)


class Session(Exchange):
    """A fuzz client that sends several messages on one connection, each answer checked.

    Chunks (or a late error) of its earlier accepted requests may arrive with any later
    answer; they are checked against their own request, in order, frame by frame.
    """

    def __init__(self, server: Server, greet: bool) -> None:
        super().__init__(server, greet)
        #: accepted requests still streaming: request id -> (request, next chunk number)
        self.streams: dict[int, tuple[protocol.Request, int]] = {}

    def answer(self, frames: Sequence[bytes]) -> list[tuple[Any, Any]]:
        """Send ``frames``; the server must survive and answer as the protocol says."""
        try:  # a client message is exactly one frame (protocol v3): anything more is malformed
            expected: Optional[protocol.Message] = protocol.parse(frames, max_parts=1)[0]
        except ProtocolError:
            expected = None
        if isinstance(expected, protocol.Hello) and expected.version == PROTOCOL_VERSION:
            self.greeted = True
        fresh = isinstance(expected, protocol.Request) and expected.request_id not in self.streams
        replies = self.send(frames, wait_for_request=expected.request_id if self.greeted and fresh else None)
        self.server.assert_alive()
        answer = [(m, p) for m, p in replies if not self._background(m, p, expected)]
        _event(f"{type(expected).__name__}{'' if self.greeted else ' (no hello)'} -> {_summary(answer)}")
        check_answer(frames, expected, self.greeted, answer, self.streams)
        if self.greeted and isinstance(expected, protocol.Bye):  # the server forgot us: hello again
            self.greeted = False
            self.streams.clear()
        if self.greeted and fresh and isinstance(answer[0][0], protocol.Chunk):
            self.streams[expected.request_id] = (expected, 0)
            for message, payload in answer:
                self._stream_chunk(message, payload)
        return answer

    def _background(self, message: Any, payload: Any, expected: Any) -> bool:
        """Whether ``message`` belongs to an earlier request (checked here), not to this answer."""
        rid = getattr(message, "request_id", None)
        if rid not in self.streams or not isinstance(message, (protocol.Chunk, protocol.Error)):
            return False
        if isinstance(message, protocol.Error):
            if isinstance(expected, protocol.Request) and expected.request_id == rid:
                return False  # the answer to reusing its id
            check_error(message)
            del self.streams[rid]
            return True
        self._stream_chunk(message, payload)
        return True

    def _stream_chunk(self, chunk: protocol.Chunk, payload: Optional[bytes]) -> None:
        request, k = self.streams[chunk.request_id]
        check_chunk(request, k, chunk, payload)
        if chunk.last_chunk:
            del self.streams[chunk.request_id]
        else:
            self.streams[chunk.request_id] = (request, k + 1)


def exchange(server: Server, frames: Sequence[bytes], greet: bool) -> list[tuple[Any, Any]]:
    """The server's checked answer to ``frames`` sent on a fresh connection."""
    session = Session(server, greet)
    try:
        return session.answer(frames)
    finally:
        session.close()


def _event(text: str) -> None:
    """Count outcomes for ``--hypothesis-show-statistics`` (only inside a hypothesis example)."""
    if currently_in_test_context():
        event(text)


def _summary(replies: list[tuple[Any, Any]]) -> str:
    if os.environ.get("FUZZ_EVENTS_VERBOSE"):
        return ", ".join(f"{m.error}: {m.message[:70]}" if isinstance(m, protocol.Error) else type(m).__name__ for m, _ in replies[:2]) or "nothing"
    return ", ".join(m.error if isinstance(m, protocol.Error) else type(m).__name__ for m, _ in replies[:2]) or "nothing"


# -- what the protocol says the answer is ------------------------------------------


def _only_errors(replies: list[tuple[Any, Any]], error: str, request_id: Optional[int] = None) -> None:
    assert len(replies) == 1, f"expected one {error} reply, got {replies}"
    (message, payload), = replies
    assert isinstance(message, protocol.Error), f"expected an error reply, got {message}"
    from asyncframes.errors import WIRE_ERRORS

    # the error named, or one of its kinds (UnknownClientError is a ProtocolError)
    assert issubclass(WIRE_ERRORS.get(message.error, object), WIRE_ERRORS[error]), message
    assert message.request_id == request_id, message
    assert message.message and payload is None


def check_answer(
    frames: Sequence[bytes], message: Optional[protocol.Message], greeted: bool, replies: list, session_streams: Optional[dict] = None
) -> None:
    """The replies are the protocol's answer to ``message`` (None: malformed)."""
    if message is None:
        _only_errors(replies, "ProtocolError")
        return
    if isinstance(message, protocol.Hello):
        if message.version == PROTOCOL_VERSION:
            assert [type(m) for m, _ in replies] == [protocol.Welcome], replies
        else:
            _only_errors(replies, "ProtocolError")
            assert str(message.version) in replies[0][0].message and str(PROTOCOL_VERSION) in replies[0][0].message
        return
    if isinstance(message, protocol.Ping):
        assert [(type(m), m.request_id) for m, _ in replies] == [(protocol.Pong, message.request_id)], replies
        return
    if not greeted:
        _only_errors(replies, "ProtocolError")
        return
    if isinstance(message, protocol.Request) and session_streams is not None and message.request_id in session_streams:
        _only_errors(replies, "ProtocolError", message.request_id)
        assert "already in use" in replies[0][0].message
    elif isinstance(message, protocol.Request):
        check_request_answer(message, replies)
    elif isinstance(message, (protocol.Credit, protocol.Release, protocol.Cancel, protocol.Bye)):
        assert replies == [], f"{message} needs no answer, got {replies}"
    elif isinstance(message, protocol.InfoRequest):
        assert len(replies) == 1, replies
        reply = replies[0][0]
        assert reply.request_id == message.request_id, reply
        if isinstance(reply, protocol.InfoReply):
            assert reply.info.frame_count == len(reference_frames(_clip_path()))
        else:
            check_error(reply)
    elif isinstance(message, protocol.Stop):
        _only_errors(replies, "ServerError")
    else:  # a server-to-client kind
        _only_errors(replies, "ProtocolError")


def check_error(reply: Any) -> None:
    """An error names one of our classes and says what is wrong."""
    assert isinstance(reply, protocol.Error), reply
    assert reply.error in WIRE_ERRORS, f"unknown error class {reply.error!r}"
    assert reply.message, reply
    assert "internal server error" not in reply.message, f"bad input crashed a request: {reply}"


def check_request_answer(request: protocol.Request, replies: list) -> None:
    """An error for it, or its first chunks, in order, of exact frames of the clip."""
    ours = [(m, p) for m, p in replies if getattr(m, "request_id", None) == request.request_id]
    assert len(ours) == len(replies), f"replies for other requests: {replies}"
    if isinstance(ours[0][0], protocol.Error):
        assert len(ours) == 1, ours
        check_error(ours[0][0])
        return
    assert all(isinstance(m, protocol.Chunk) for m, _ in ours), ours


def check_chunk(request: protocol.Request, k: int, chunk: Any, payload: Optional[bytes]) -> None:
    """Chunk ``k`` of ``request``: the right frame indices, exact pixels (inline chunks)."""
    assert isinstance(chunk, protocol.Chunk) and chunk.chunk == k, f"expected chunk {k} of {request}, got {chunk}"
    wanted = [int(i) for i in protocol.selection_indices(request.frame_idxs, len(reference_frames(_clip_path())))]
    fpc = request.frames_per_chunk
    assert chunk.frame_idxs == wanted[k * fpc : (k + 1) * fpc]
    assert chunk.last_chunk == ((k + 1) * fpc >= len(wanted))
    if chunk.shm is None:
        frames = protocol.chunk_array(chunk, None if payload is None else memoryview(payload))
        assert_color_frames_exact(_clip_path(), chunk.frame_idxs, frames)
    else:
        assert payload is None


def assert_color_frames_exact(path: Path, frame_idxs: Sequence[int], frames: np.ndarray) -> None:
    """Frames of a colour clip: RGB equal to the sequential decode, grayscale its luma."""
    if frames.shape[-1] == 3:
        assert_frames_exact(path, frame_idxs, frames)
        return
    ref = reference_frames(path)
    assert frames.dtype == np.uint8 and frames.shape[0] == len(frame_idxs)
    for pos, i in enumerate(frame_idxs):
        assert np.array_equal(frames[pos, ..., 0], luma(ref[i])), f"grayscale frame {i} differs from the decode's luma"


_CLIP_PATH: list[Path] = []


def _clip_path() -> Path:
    return _CLIP_PATH[0]


@pytest.fixture(scope="module", autouse=True)
def _remember_clip(fuzz_root: Path) -> None:
    _CLIP_PATH[:] = [fuzz_root / CLIP]


def assert_serves_exactly(server: Server, root: Path) -> None:
    """A good client, after the fuzz, gets exact frames in order."""
    server.assert_alive()
    idxs = shuffled_with_duplicates(150, 30, seed=8)
    with AsyncVideo(server.endpoint, timeout=30) as av:
        assert av.info(CLIP).frame_count == 150
        av.load_by_chunk(CLIP, idxs, frames_per_chunk=16)
        got = list(av.chunks)
    assert [i for chunk_idxs, _ in got for i in chunk_idxs] == idxs
    for chunk_idxs, frames in got:
        assert_frames_exact(root / CLIP, chunk_idxs, frames)


# -- strategies --------------------------------------------------------------------

#: Integers msgpack can carry, with the edges a decoder might mishandle.
wire_ints = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
scalars = st.one_of(
    st.none(), st.booleans(), wire_ints, st.floats(), st.text(max_size=40), st.binary(max_size=40)
)
keys = st.one_of(st.text(max_size=12), st.sampled_from(["kind", "request_id", "video", "frame_idxs", "version"]))
msgpack_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(keys, children, max_size=6),
    max_leaves=30,
)
#: Maps with a real kind and random fields: these get past the first checks.
kinded_maps = st.builds(
    lambda kind, body: {**body, "kind": kind},
    st.sampled_from(sorted(protocol.KINDS)),
    st.dictionaries(keys, msgpack_values, max_size=8),
)
filenames = st.one_of(
    st.sampled_from(
        [CLIP, "./" + CLIP, "sub/../" + CLIP, "notes.txt", "", ".", "..", "/", "sub", "/etc/passwd", "../x.mp4",
         "missing.mp4", "a\x00b", "x" * 5000, "file:" + CLIP, "concat:" + CLIP, "/proc/self/fd/0"]
    ),
    st.text(max_size=30),
)
small_idxs = st.lists(st.integers(0, 149), max_size=20)


@st.composite
def valid_messages(draw: st.DrawFn) -> protocol.Message:
    """A real message of any kind, as the classes make it."""
    rid = draw(st.integers(0, 1000))
    video = Video(CLIP, grayscale=draw(st.sampled_from([None, True, False])))
    chunk = protocol.Chunk(request_id=rid, chunk=0, last_chunk=True, frame_idxs=[0], dtype="|u1", shape=[1, 2, 2, 3])
    info = protocol.VideoInfo(CLIP, 150, 96, 128, 3, False, 30.0, "h264", "yuv420p", "mp4")
    return draw(
        st.sampled_from(
            [
                protocol.Hello(version=PROTOCOL_VERSION, client="fuzz"),
                protocol.Request(
                    request_id=rid,
                    video=video,
                    frame_idxs=protocol.frame_selection(draw(st.one_of(st.none(), small_idxs))),
                    frames_per_chunk=draw(st.integers(1, 8)),
                    window=draw(st.integers(1, 3)),
                    ahead=draw(st.sampled_from([0, 0, 1, 3])),
                ),
                protocol.Credit(request_id=rid, chunks=draw(st.integers(1, 5))),
                protocol.Cancel(request_id=rid),
                protocol.Release(slots=draw(st.lists(st.integers(0, 20), max_size=4))),
                protocol.Bye(slots=draw(st.lists(st.integers(0, 20), max_size=4))),
                protocol.InfoRequest(request_id=rid, video=video),
                protocol.Ping(request_id=rid),
                protocol.Stop(),
                protocol.Welcome(version=PROTOCOL_VERSION, server="x"),
                chunk,
                protocol.Error(request_id=rid, error="ServerError", message="x"),
                protocol.InfoReply(request_id=rid, info=info),
                protocol.Pong(request_id=rid),
                protocol.Shutdown(reason="x"),
            ]
        )
    )


nonneg_ints = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 8, 9, 1024, 1025, 2**31, 2**63, 2**64 - 1]))
positive_ints = st.one_of(st.integers(1, 2**64 - 1), st.sampled_from([1, 2, 8, 9, 1024, 1025, 2**31, 2**63, 2**64 - 1]))
#: Mostly the clip (so requests get past the file to their other fields), else any name.
request_files = st.one_of(st.just(CLIP), st.just(CLIP), filenames.filter(bool))  # Video refuses an empty name itself


@st.composite
def odd_requests(draw: st.DrawFn, request_id: int) -> protocol.Request:
    """A request the classes accept but the server may not: any file, stream, size, index, window."""
    stream = draw(st.one_of(st.just(0), st.just(0), nonneg_ints))
    video = Video(draw(request_files), grayscale=draw(st.sampled_from([None, True, False])), stream=stream)
    idxs = draw(
        st.one_of(
            st.none(),
            st.builds(protocol.frame_selection, small_idxs),
            st.builds(protocol.frame_selection, st.lists(st.integers(0, 160), max_size=200)),
            st.builds(  # any uint32 the wire can carry, far beyond the clip
                lambda values: np.asarray(values, dtype="<u4").tobytes(), st.lists(st.integers(0, 2**32 - 1), max_size=5)
            ),
            st.builds(  # ranges: empty, backwards, past the end
                lambda start, stop, step: protocol.FrameRange(start, stop, step),
                st.integers(0, 200),
                st.integers(-1, 200),
                st.integers(1, 40) | st.integers(-40, -1),
            ),
        )
    )
    fpc = draw(st.one_of(st.integers(1, 200), positive_ints))
    window = draw(st.one_of(st.integers(1, 10), positive_ints))
    ahead = draw(st.one_of(st.just(0), st.just(0), st.integers(0, 200), nonneg_ints))  # frames read ahead
    return protocol.Request(request_id, video, idxs, frames_per_chunk=fpc, window=window, shm=draw(st.booleans()), ahead=ahead)


@st.composite
def odd_sequences(draw: st.DrawFn) -> list[protocol.Message]:
    """A few well-formed client messages with odd values, on one connection (requests with new ids)."""
    rids = st.one_of(st.integers(100, 104), nonneg_ints)
    messages: list[protocol.Message] = []
    for position in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["request", "request", "credit", "cancel", "release", "info", "ping"]))
        if kind == "request":
            messages.append(draw(odd_requests(100 + position)))
        elif kind == "credit":
            messages.append(protocol.Credit(draw(rids), chunks=draw(positive_ints)))
        elif kind == "cancel":
            messages.append(protocol.Cancel(draw(rids)))
        elif kind == "release":
            messages.append(protocol.Release(draw(st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5))))
        elif kind == "info":
            stream = draw(st.one_of(st.just(0), nonneg_ints))
            video = Video(draw(request_files), grayscale=draw(st.sampled_from([None, True, False])), stream=stream)
            messages.append(protocol.InfoRequest(draw(nonneg_ints), video))
        else:
            messages.append(protocol.Ping(draw(nonneg_ints)))
    return messages


def _path_to(body: Any, draw: st.DrawFn) -> list[Any]:
    """A random path of keys/indices into a nested map or list (possibly empty)."""
    path: list[Any] = []
    while isinstance(body, (dict, list)) and body and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(body, key=repr) if isinstance(body, dict) else list(range(len(body)))))
        path.append(key)
        body = body[key]
    return path


def _mutate(body: Any, draw: st.DrawFn) -> Any:
    """One mutation somewhere in ``body``: a field dropped, retyped, made huge or negative, nested, added."""
    path = _path_to(body, draw)
    if not path:
        container, key = None, None
        value = body
    else:
        container = body
        for key in path[:-1]:
            container = container[key]
        key = path[-1]
        value = container[key]
    op = draw(st.sampled_from(["drop", "retype", "int", "nest", "extra", "kind", "filename", "idxs"]))
    if op == "drop" and container is not None:
        del container[key]
        return body
    if op == "extra" and isinstance(value, dict):
        value[draw(keys)] = draw(msgpack_values)
        return body
    if op == "kind" and isinstance(body, dict):
        body["kind"] = draw(st.one_of(st.sampled_from(sorted(protocol.KINDS)), st.text(max_size=10), scalars))
        return body
    if op == "filename" and isinstance(body, dict) and isinstance(body.get("video"), dict):
        body["video"]["filename"] = draw(filenames)
        return body
    if op == "idxs" and isinstance(body, dict) and "frame_idxs" in body:
        body["frame_idxs"] = draw(st.one_of(st.lists(wire_ints, max_size=50), st.lists(st.integers(-3, 160), max_size=300)))
        return body
    new = {
        "int": lambda: draw(wire_ints),
        "nest": lambda: draw(st.sampled_from([[value], {"x": value}, [value, value]])),
    }.get(op, lambda: draw(msgpack_values))()
    if container is None:
        return new
    container[key] = new
    return body


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A real message's header with one to three mutations, and sometimes its bytes cut or extended."""
    body = msgpack.unpackb(protocol.encode(draw(valid_messages())), raw=False)
    for _ in range(draw(st.integers(1, 3))):
        body = _mutate(body, draw)
    header = msgpack.packb(body, use_bin_type=True)
    cut = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "append"]))
    if cut == "truncate":
        header = header[: draw(st.integers(0, max(0, len(header) - 1)))]
    elif cut == "append":
        header += draw(st.binary(min_size=1, max_size=8))
    return header


# -- the properties ----------------------------------------------------------------


def _has_known_kind(body: Any) -> bool:
    """Whether ``body`` could be a message at all: a map whose ``kind`` is one of ours."""
    return isinstance(body, dict) and isinstance(body.get("kind"), str) and body["kind"] in protocol.KINDS


@FUZZ
@given(header=st.binary(max_size=200), greet=st.booleans())
def test_arbitrary_bytes_get_a_protocol_error(server, header, greet):
    replies = exchange(server, [header], greet)
    try:
        body = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception:
        _only_errors(replies, "ProtocolError")  # not msgpack: nothing else is possible
        return
    if not _has_known_kind(body):
        _only_errors(replies, "ProtocolError")


@FUZZ
@given(value=st.one_of(msgpack_values, kinded_maps), greet=st.booleans())
def test_arbitrary_msgpack_gets_a_protocol_error_or_its_answer(server, value, greet):
    header = msgpack.packb(value, use_bin_type=True)
    replies = exchange(server, [header], greet)
    if not _has_known_kind(value):
        _only_errors(replies, "ProtocolError")


@FUZZ
@given(header=mutated_messages(), greet=st.sampled_from([True, True, True, False]))
def test_mutated_messages_get_a_protocol_error_or_their_answer(server, header, greet):
    exchange(server, [header], greet)


@FUZZ
@given(
    header=st.one_of(st.builds(protocol.encode, valid_messages()), mutated_messages(), st.binary(max_size=40)),
    extra=st.lists(st.binary(max_size=64), min_size=1, max_size=3),
    greet=st.booleans(),
)
def test_extra_parts_get_a_protocol_error(server, header, extra, greet):
    replies = exchange(server, [header, *extra], greet)
    _only_errors(replies, "ProtocolError")
    assert "expected 1 part" in replies[0][0].message


@FUZZ
@given(messages=odd_sequences(), greet=st.sampled_from([True, True, True, False]))
def test_odd_but_well_formed_messages_get_their_answers(server, messages, greet):
    session = Session(server, greet)
    try:
        for message in messages:
            session.answer([protocol.encode(message)])
    finally:
        session.close()


def test_valid_messages_get_their_defined_answers(server, fuzz_root):
    """The oracle itself: each real client message, sent correctly, gets what the protocol says."""
    hello = protocol.Hello(version=PROTOCOL_VERSION)
    request = protocol.Request(request_id=3, video=Video(CLIP), frame_idxs=protocol.frame_selection([5, 1, 9]), frames_per_chunk=2, window=2)
    replies = exchange(server, [protocol.encode(request)], greet=True)
    assert [type(m) for m, _ in replies][:1] == [protocol.Chunk]
    assert isinstance(exchange(server, [protocol.encode(hello)], greet=False)[0][0], protocol.Welcome)
    old = exchange(server, [protocol.encode(protocol.Hello(version=PROTOCOL_VERSION + 1))], greet=False)
    assert old[0][0].error == "ProtocolError"
    pong = exchange(server, [protocol.encode(protocol.Ping(request_id=4))], greet=False)[0][0]
    assert isinstance(pong, protocol.Pong) and pong.request_id == 4
    info = exchange(server, [protocol.encode(protocol.InfoRequest(request_id=5, video=Video("missing.mp4")))], greet=True)
    assert info[0][0].error == "VideoNotFoundError"
    refused = exchange(server, [protocol.encode(request)], greet=False)
    assert "hello" in refused[0][0].message
    session = Session(server, greet=True)  # an id in use (window 1, no credit: it stays in use)
    try:
        long = protocol.Request(request_id=7, video=Video(CLIP), frame_idxs=None, frames_per_chunk=1, window=1)
        assert [type(m) for m, _ in session.answer([protocol.encode(long)])] == [protocol.Chunk]
        again = session.answer([protocol.encode(long)])
        assert again[0][0].error == "ProtocolError" and "already in use" in again[0][0].message
        assert session.answer([protocol.encode(protocol.Credit(request_id=7, chunks=2))]) == []
    finally:
        session.close()


def test_the_server_serves_exactly_after_the_fuzz(server, fuzz_root):
    assert_serves_exactly(server, fuzz_root)
    assert "Traceback" not in server.log, server.log[-4000:]
