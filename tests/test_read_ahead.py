"""Reading ahead for a person stepping forward, driven on both cores: no sockets, no clocks.

A request for one frame also asks for the frames after it (``Request.ahead``); the server
sends a window of them on credit, and the caller's next request for the next frame takes
the one that is already here instead of going out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncframes import _protocol as protocol
from asyncframes._client_state import (
    AHEAD_CHUNK_BYTES,
    AHEAD_FRAMES_PER_CHUNK,
    Actions,
    ClientState,
    ConnectionEvent,
    Held,
)
from asyncframes._protocol import Credit, Request
from asyncframes._server_state import READ_AHEAD_DELAY_S, READ_AROUND_DELAY_S
from asyncframes._video import Video
from asyncframes.errors import AsyncFramesError, FrameIndexError, ProtocolError

from .test_client_state import VIDEO, C, H, W, chunk_of, raised, sent
from .test_server_state import A, Harness, only_error

pytestmark = pytest.mark.pure

AHEAD = 4


def client(read_ahead: int = AHEAD, servers: int = 1, server_version: str = "1.0") -> ClientState:
    state = ClientState([f"tcp://server{i}:9010" for i in range(servers)], read_ahead=read_ahead, version="1.0")
    for i in range(servers):
        state.received(i, protocol.Welcome(protocol.PROTOCOL_VERSION, server_version))
    return state


def step(state: ClientState, i: int, video: Video = VIDEO, fpc: int = 1) -> Optional[Actions]:
    """What a driver's ``load_by_chunk(video, [i], fpc)`` does: None if it continued the request."""
    if state.continues(video, range(i, i + 1), fpc):
        return None
    rid = state.new_request_id()
    return state.start_request(rid, video, range(i, i + 1), fpc)


def requests(actions: Optional[Actions]) -> list[Request]:
    assert actions is not None
    return [message for _server, message in sent(actions, Request)]


def arrive(state: ClientState, rid: int, k: int, i: int, last: bool = False) -> None:
    assert state.received(0, *chunk_of(rid, k, [i], last)) == Actions()


def take(state: ClientState) -> tuple[list[int], Actions]:
    arrival = state.next_ready()
    assert arrival is not None
    assert state.check(arrival) == Actions()
    return list(arrival.message.frame_idxs), state.took(arrival)


# -- the client's side -----------------------------------------------------------------------------------------------------


def test_one_frame_asks_for_the_frames_after_it_in_chunks_of_one():
    (request,) = requests(step(client(), 10, fpc=64))
    assert request.frame_idxs == protocol.FrameRange(10, 11 + AHEAD, 1)
    assert (request.frames_per_chunk, request.ahead) == (1, AHEAD)


@pytest.mark.parametrize(
    "state, idxs",
    [
        (client(read_ahead=0), [10]),  # turned off
        (client(server_version="0.9"), [10]),  # a server of another version may not know the field
        (client(servers=2), [10]),  # dealt over servers: each chunk from another one
        (client(), [10, 11]),  # more than one frame: a clip, not a step
        (client(), None),  # every frame
    ],
)
def test_nothing_is_read_ahead_otherwise(state, idxs):
    rid = state.new_request_id()
    for _server, request in sent(state.start_request(rid, VIDEO, idxs, 1 if idxs is None else len(idxs)), Request):
        assert request.ahead == 0 and request.frames_per_chunk == (1 if idxs is None else len(idxs))


def test_stepping_forward_takes_the_chunks_read_ahead_without_asking_again():
    state = client()
    (request,) = requests(step(state, 10))
    rid = request.request_id
    for k in range(3):  # the frame asked for, and a window of frames ahead (and one more, on credit)
        arrive(state, rid, k, 10 + k)
    assert take(state)[0] == [10]
    assert state.next_ready() is None and state.stream.done  # the caller has what it asked for
    assert state.in_flight  # and the frames after it still come
    for i in [11, 12]:
        assert step(state, i) is None  # nothing to send: the chunk is here
        got, actions = take(state)
        assert got == [i] and sent(actions, Credit) == [(0, Credit(rid, 1))]  # the server reads on
    assert state.stream.done and state.stream.delivered == 3


def test_a_person_stepping_through_a_hundred_frames_asks_once():
    # At 32 frames read ahead, every 33rd step asked again and waited for the decoder (3.5 ms).
    from asyncframes._client import READ_AHEAD_FRAMES

    state = client(read_ahead=READ_AHEAD_FRAMES)
    (request,) = requests(step(state, 10))
    arrive(state, request.request_id, 0, 10)
    assert take(state)[0] == [10]
    for k, i in enumerate(range(11, 111), start=1):
        arrive(state, request.request_id, k, i)
        assert step(state, i) is None, f"step {k} (to frame {i}) asked the server again"
        assert take(state)[0] == [i]


def test_a_step_back_a_jump_or_another_video_asks_again_and_cancels_what_is_read_ahead():
    for i, video in [(10, VIDEO), (12, VIDEO), (40, VIDEO), (11, Video("other.mp4")), (11, Video("clip.mp4", grayscale=True))]:
        state = client()
        (first,) = requests(step(state, 10))
        arrive(state, first.request_id, 0, 10)
        take(state)
        actions = step(state, i, video)
        (request,) = requests(actions)  # the cancel goes with it (a server of our version)
        assert request.replaces == first.request_id and sent(actions, protocol.Cancel) == [], (i, video)
        assert request.frame_idxs == protocol.FrameRange(i, i + 1 + AHEAD, 1)


def test_a_step_before_the_caller_took_its_frame_is_a_new_request():
    state = client()
    (first,) = requests(step(state, 10))
    assert requests(step(state, 11))[0].request_id != first.request_id


def test_an_iteration_ends_with_the_frame_asked_for_and_a_step_starts_the_next():
    state = client()
    (request,) = requests(step(state, 10))
    for k in range(3):
        arrive(state, request.request_id, k, 10 + k)
    stream = state.iteration_start()
    assert stream.chunks_left() == 1
    take(state)
    assert state.iteration_over(stream) and stream.chunks_left() == 0
    with pytest.raises(AsyncFramesError, match="fully consumed"):
        state.iteration_start()  # consumed: iterating again raises
    assert step(state, 11) is None
    stream = state.iteration_start()
    assert stream.chunks_left() == 1 and not state.iteration_over(stream)


def test_near_the_end_the_request_may_end_after_the_frame_asked_for():
    state = client()
    (request,) = requests(step(state, 98))  # of 100 frames: the server drops 100 and after
    arrive(state, request.request_id, 0, 98)
    arrive(state, request.request_id, 1, 99, last=True)
    take(state)
    assert step(state, 99) is None
    assert take(state)[0] == [99]
    assert state.stream.finished
    assert requests(step(state, 100))  # nothing more read ahead: asked for (the server says it is no frame)
    cancels = sent(state.cancel(), protocol.Cancel)
    assert cancels == [(0, protocol.Cancel(state.last.request_id))]


def test_a_last_chunk_before_the_frame_asked_for_is_a_protocol_error():
    state = client()
    state.read_ahead = 0
    rid = state.new_request_id()
    state.start_request(rid, VIDEO, [1, 2], 1)
    state.received(0, *chunk_of(rid, 0, [1], True))
    assert isinstance(raised(state.check(state.next_ready())), ProtocolError)


def test_an_error_about_a_frame_read_ahead_is_raised_only_when_the_caller_steps_to_it():
    state = client()
    (request,) = requests(step(state, 10))
    arrive(state, request.request_id, 0, 10)
    error = protocol.Error(request.request_id, "VideoDecodeError", "frame 11 is damaged")
    assert state.received(0, error) == Actions()
    take(state)
    assert state.next_ready() is None  # the caller has what it asked for: nothing raised
    assert step(state, 11) is None
    assert raised(state.check(state.next_ready())).args[0] == "frame 11 is damaged"


def test_once_the_caller_has_its_frame_a_lost_connection_is_no_error_and_the_next_step_asks_again():
    state = client()
    (request,) = requests(step(state, 10))
    arrive(state, request.request_id, 0, 10)
    take(state)
    assert not state.busy(0)
    assert state.connection_event(0, ConnectionEvent.LOST, busy=False).error is None
    state.received(0, protocol.Welcome(protocol.PROTOCOL_VERSION, "1.0"))
    assert requests(step(state, 11))  # the frames read ahead went with the old connection


def test_replacing_a_request_that_reads_ahead_cancels_it_even_once_the_caller_has_its_frames():
    state = client()
    (request,) = requests(step(state, 10))
    arrive(state, request.request_id, 0, 10)
    arrive(state, request.request_id, 1, 11)
    take(state)
    actions = state.cancel()
    assert sent(actions, protocol.Cancel) == [(0, protocol.Cancel(request.request_id))]
    with pytest.raises(AsyncFramesError, match="fully consumed"):  # for the caller, it had ended
        state.iteration_start()


# -- several frames read ahead a chunk ---------------------------------------------------------------------------------------

PER_CHUNK = 4  # frames read ahead a chunk, for frames of a quarter of AHEAD_CHUNK_BYTES


def knowing(frame_bytes: int = AHEAD_CHUNK_BYTES // PER_CHUNK) -> ClientState:
    """A client reading 16 frames ahead that asked for VIDEO's info and was told its frames are ``frame_bytes`` each."""
    state = client(read_ahead=16)
    rid = state.new_request_id()
    state.expect(rid, VIDEO)
    info = protocol.VideoInfo("v.mp4", 100, 1, frame_bytes // 3, 3, False, 25.0, "h264", "yuv420p", "mp4")
    assert state.received(0, protocol.InfoReply(rid, info)) == Actions()
    state.abandon(rid)
    return state


def arrive_chunk(state: ClientState, rid: int, k: int, idxs: list[int], last: bool = False) -> None:
    assert state.received(0, *chunk_of(rid, k, idxs, last)) == Actions()


def next_frame(state: ClientState) -> "tuple[list[int], Actions | Held]":
    """What a driver's next_chunk() does: the frame the caller gets of the chunk it takes (and what is due), or the
    frame in hand."""
    ready = state.next_ready()
    assert ready is not None
    if isinstance(ready, Held):
        return [ready.frame], ready
    assert state.check(ready) == Actions()
    return list(ready.message.frame_idxs)[:1], state.took(ready)


@pytest.mark.parametrize(
    "frame_bytes, per_chunk",
    [(AHEAD_CHUNK_BYTES // PER_CHUNK, PER_CHUNK), (384 * 384 * 3, AHEAD_FRAMES_PER_CHUNK), (1920 * 1080 * 3, 2),
     (3840 * 2160 * 3, 1), (AHEAD_CHUNK_BYTES + 3, 1)],
)
def test_once_the_frame_size_is_known_frames_read_ahead_come_several_a_chunk(frame_bytes, per_chunk):
    (request,) = requests(step(knowing(frame_bytes), 10))
    assert request.frame_idxs == protocol.FrameRange(10, 11 + 16, 1)
    assert (request.frames_per_chunk, request.ahead, request.ahead_frames_per_chunk) == (1, 16, per_chunk if per_chunk > 1 else 0)


def test_a_chunk_taken_tells_the_frame_size_too_and_other_videos_stay_unknown():
    state = client()
    (first,) = requests(step(state, 10))
    arrive(state, first.request_id, 0, 10)
    take(state)
    (again,) = requests(step(state, 40))
    assert again.ahead_frames_per_chunk == min(AHEAD_FRAMES_PER_CHUNK, AHEAD_CHUNK_BYTES // (H * W * C))
    (other,) = requests(step(state, 40, Video("other.mp4")))
    assert other.ahead_frames_per_chunk == 0


def test_steps_within_a_chunk_read_ahead_take_the_frame_in_hand_and_send_nothing():
    state = knowing()
    (request,) = requests(step(state, 10))
    rid = request.request_id
    arrive_chunk(state, rid, 0, [10])
    arrive_chunk(state, rid, 1, [11, 12, 13, 14])
    arrive_chunk(state, rid, 2, [15, 16, 17, 18])
    got, _ = next_frame(state)
    assert got == [10] and state.stream.done
    seen = []
    for i in range(11, 19):
        assert step(state, i) is None, f"step to {i} asked the server again"
        got, what = next_frame(state)
        assert got == [i] and state.stream.done and state.next_ready() is None
        seen.append(what if isinstance(what, Held) else sent(what, Credit))
    credit = [(0, Credit(rid, 1))]
    assert seen == [credit, Held(12, 1), Held(13, 2), Held(14, 3), credit, Held(16, 1), Held(17, 2), Held(18, 3)]
    assert state.stream.delivered == 9
    assert state.next_ready() is None  # chunk 3 has not come: the step to 19 waits for it
    assert step(state, 19) is None and state.next_ready() is None and not state.stream.done


def test_a_step_back_or_a_jump_within_the_chunk_in_hand_asks_again():
    for i in [10, 11, 13]:  # back to the frame shown, further back, a frame skipped
        state = knowing()
        (request,) = requests(step(state, 10))
        arrive_chunk(state, request.request_id, 0, [10])
        arrive_chunk(state, request.request_id, 1, [11, 12, 13, 14])
        next_frame(state)
        assert step(state, 11) is None
        next_frame(state)
        assert requests(step(state, i)), i


def test_near_the_end_the_last_chunk_read_ahead_holds_the_frames_left():
    state = knowing()  # of 100 frames: the server drops 100 and after
    (request,) = requests(step(state, 97))
    rid = request.request_id
    arrive_chunk(state, rid, 0, [97])
    arrive_chunk(state, rid, 1, [98, 99], last=True)
    next_frame(state)
    assert step(state, 98) is None and next_frame(state)[0] == [98]
    assert step(state, 99) is None and next_frame(state) == ([99], Held(99, 1))
    assert state.stream.finished and not state.in_flight
    assert requests(step(state, 100))  # nothing more read ahead: asked for (the server says it is no frame)


@pytest.mark.parametrize("idxs, last", [([11, 12], False), ([11, 13, 14, 15], False), ([12], True), ([11, 12, 13, 14, 15], False)])
def test_a_chunk_read_ahead_that_is_not_the_frames_next_in_line_is_a_protocol_error(idxs, last):
    state = knowing()
    (request,) = requests(step(state, 10))
    arrive_chunk(state, request.request_id, 0, [10])
    next_frame(state)
    assert step(state, 11) is None
    arrive_chunk(state, request.request_id, 1, idxs, last)
    assert isinstance(raised(state.check(state.next_ready())), ProtocolError)


@given(
    fpc=st.integers(1, 9), asked=st.integers(1, 40), ahead=st.integers(0, 40), per_chunk=st.integers(0, 9), dropped=st.integers(0, 40)
)
def test_chunks_hold_every_frame_once_in_order_and_frames_read_ahead_never_share_a_chunk_with_those_asked_for(
    fpc, asked, ahead, per_chunk, dropped
):
    chunking = protocol.Chunking(fpc, asked, per_chunk)
    count = asked + max(0, ahead - dropped)  # the server drops frames read ahead past the video's end
    spans = [chunking.bounds(k) for k in range(chunking.chunks(count))]
    positions = [p for start, stop in spans for p in range(start, min(stop, count))]
    assert positions == list(range(count))
    assert all(start < min(stop, count) for start, stop in spans), "no empty chunk"
    assert all(stop - start <= chunking.most for start, stop in spans)
    if per_chunk:
        assert all(stop <= asked or start >= asked for start, stop in spans)
        assert all(stop - start == per_chunk for start, stop in spans if start >= asked)
    else:
        assert spans == [(k * fpc, (k + 1) * fpc) for k in range(len(spans))]


# -- the server's side -----------------------------------------------------------------------------------------------------


def ahead_request(h: Harness, rid: int, idxs, ahead: int, window: int = 2) -> list:
    return h.send(A, Request(rid, Video("v.mp4"), idxs, frames_per_chunk=1, window=window, ahead=ahead))


@pytest.mark.parametrize("idxs", [range(97, 103), np.arange(97, 103), [97, 98, 120, 99, 101, 100]])
def test_frames_read_ahead_past_the_end_are_dropped(idxs):
    h = Harness()  # 100 frames
    h.hello(A)
    assert ahead_request(h, 1, idxs, ahead=5, window=5) == []
    chunks = []
    while (got := h.chunk()) is not None or h.state.wait_s(h.now, {}) == pytest.approx(READ_AHEAD_DELAY_S):
        chunks += [got[1]] if got is not None else []
        h.now += READ_AHEAD_DELAY_S
    assert [c.frame_idxs for c in chunks] == [[97], [98], [99]]
    assert chunks[-1].last_chunk


def test_the_frames_asked_for_must_be_frames_and_something_must_be_asked_for():
    h = Harness()
    h.hello(A)
    assert only_error(ahead_request(h, 1, range(100, 105), ahead=4)).error == FrameIndexError.__name__
    for rid, (idxs, ahead) in enumerate([(range(5), 5), (range(5), 9), (None, 1)], 2):
        error = only_error(ahead_request(h, rid, idxs, ahead))
        assert error.error == "ProtocolError" and "ahead" in error.message


def test_a_request_reading_ahead_is_small_by_the_frames_asked_for():
    h = Harness(recent_request_frames=8)
    h.hello(A)
    ahead_request(h, 1, range(10, 43), ahead=32)
    decodes = [h.chunk()[0]]
    h.now += READ_AHEAD_DELAY_S
    decodes.append(h.chunk()[0])
    assert all(d.recent for d in decodes) and [d.frames for d in decodes] == [[10], [11]]


def test_frames_read_ahead_wait_for_a_quiet_moment_after_each_chunk_and_credit():
    """A client that asks again at once (the same frame, another one) is not kept waiting
    behind a frame read ahead; one stepping tens of milliseconds apart finds it there."""
    h = Harness()
    h.hello(A)
    ahead_request(h, 1, range(10, 20), ahead=9, window=2)
    assert h.chunk()[1].frame_idxs == [10]  # asked for: at once
    assert h.chunk() is None and h.state.wait_s(h.now, {}) == pytest.approx(READ_AHEAD_DELAY_S)
    h.now += READ_AHEAD_DELAY_S
    assert h.chunk()[1].frame_idxs == [11]
    assert h.chunk() is None  # each chunk read ahead waits again
    h.send(A, Credit(1, 1))
    h.now += READ_AHEAD_DELAY_S / 2
    assert h.chunk() is None  # credit is the client speaking: quiet again from there
    h.now += READ_AHEAD_DELAY_S / 2
    assert h.chunk()[1].frame_idxs == [12]
    h.request(A, 2, idxs=range(30, 33), fpc=1, window=3)  # an ordinary request never waits
    assert [h.chunk()[1].frame_idxs for _ in range(3)] == [[30], [31], [32]]


def test_a_request_reading_ahead_is_not_read_around_unless_it_stepped_back():
    """Reading ahead already brings the frames after it; reading around them too would only
    keep the decoder busy while the person steps."""
    h = Harness(read_around_frames=10)
    h.hello(A)
    ahead_request(h, 1, range(40, 73), ahead=32)
    h.chunk()
    h.now += READ_AROUND_DELAY_S
    assert h.state.read_around(h.now) is None
    h.send(A, protocol.Cancel(1))
    ahead_request(h, 2, range(39, 72), ahead=32)  # a step back: the frames before it are read around
    h.chunk()
    h.now += READ_AROUND_DELAY_S
    assert h.state.read_around(h.now).frames[:5] == (34, 35, 36, 37, 38)


def test_a_step_back_behind_what_was_read_ahead_reads_behind_first():
    """The server read two frames ahead of the caller: a step back from where the caller
    is, not from where the server got to, is still a step back."""
    h = Harness(read_around_frames=10)
    h.hello(A)
    ahead_request(h, 1, range(40, 73), ahead=32)
    for _ in range(2):  # 40 for the caller, 41 and 42 read ahead
        h.chunk()
        h.now += READ_AHEAD_DELAY_S
    h.send(A, protocol.Cancel(1))
    h.request(A, 2, idxs=[39], fpc=1)  # a person at 40 steps back
    h.chunks()
    h.now += READ_AROUND_DELAY_S
    assert h.state.read_around(h.now).frames[:5] == (34, 35, 36, 37, 38)


def test_the_server_sends_frames_read_ahead_in_chunks_of_the_size_asked_and_counts_them_in_the_window():
    h = Harness(max_frames_per_chunk=64)  # 100 frames
    h.hello(A)
    h.send(A, Request(1, Video("v.mp4"), range(90, 100), frames_per_chunk=1, window=2, ahead=9, ahead_frames_per_chunk=4))
    assert h.state.window_bytes(A) == 2 * 4 * 4 * 4 * 3
    got = [h.chunk()[1]]
    assert h.chunk() is None  # frames read ahead wait for quiet, as in chunks of one
    h.now += READ_AHEAD_DELAY_S
    got.append(h.chunk()[1])
    h.send(A, Credit(1, 1))
    h.now += READ_AHEAD_DELAY_S
    got.append(h.chunk()[1])
    assert [(c.chunk, c.frame_idxs, c.shape[0], c.last_chunk) for c in got] == [
        (0, [90], 1, False), (1, [91, 92, 93, 94], 4, False), (2, [95, 96, 97, 98], 4, False)
    ]
    h.send(A, Credit(1, 1))
    h.now += READ_AHEAD_DELAY_S
    last = h.chunk()[1]
    assert (last.chunk, last.frame_idxs, last.last_chunk) == (3, [99], True)  # the frames left


def test_chunks_read_ahead_over_the_servers_limits_are_refused():
    h = Harness(max_frames_per_chunk=8)
    h.hello(A)
    error = only_error(h.send(A, Request(1, Video("v.mp4"), range(10, 20), frames_per_chunk=1, ahead=9, ahead_frames_per_chunk=9)))
    assert error.error == "ServerError" and "ahead_frames_per_chunk 9" in error.message
