"""Reading ahead for a person stepping forward, driven on both cores: no sockets, no clocks.

A request for one frame also asks for the frames after it (``Request.ahead``); the server
sends a window of them on credit, and the caller's next request for the next frame takes
the one that is already here instead of going out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest

from asyncframes import _protocol as protocol
from asyncframes._client_state import Actions, ClientState, ConnectionEvent
from asyncframes._protocol import Credit, Request
from asyncframes._server_state import READ_AHEAD_DELAY_S, READ_AROUND_DELAY_S
from asyncframes._video import Video
from asyncframes.errors import AsyncFramesError, FrameIndexError, ProtocolError

from .test_client_state import VIDEO, chunk_of, raised, sent
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
        assert sent(actions, protocol.Cancel) == [(0, protocol.Cancel(first.request_id))], (i, video)
        assert [r.frame_idxs for r in requests(actions)] == [protocol.FrameRange(i, i + 1 + AHEAD, 1)]


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
