"""The client core's rules, driven directly: no sockets, processes, clocks or sleeps.

Each test feeds :class:`~asyncframes._client_state.ClientState` what a driver
would (messages, connection events, the chunk the caller took) and checks what
it answers: the messages to send, the sockets to replace, the error to raise.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes import _protocol as protocol
from asyncframes._client_state import (
    Actions,
    Admit,
    ClientState,
    ConnectionEvent,
    Health,
    Send,
    deal,
)
from asyncframes._video import Video
from asyncframes.errors import (
    AsyncFramesError,
    AuthenticationError,
    FrameIndexError,
    ProtocolError,
    RequestCancelledError,
    ServerDiedError,
    ServerError,
    ServerShutdownError,
    VideoOpenError,
)

pytestmark = pytest.mark.pure

VIDEO = Video("clip.mp4")
H, W, C = 4, 6, 3


# -- helpers: what a driver would feed the core ----------------------------------------------------------------------


def client(servers: int = 1, window: int = 2, shm_pid: Optional[int] = None, max_request_frames: Optional[int] = None) -> ClientState:
    """A core whose ``servers`` servers have all welcomed it."""
    state = ClientState([f"tcp://server{i}:9010" for i in range(servers)], window=window)
    for i in range(servers):
        welcome(state, i, shm_pid=shm_pid, max_request_frames=max_request_frames)
    return state


def welcome(state: ClientState, server: int, shm_pid: Optional[int] = None, max_request_frames: Optional[int] = None) -> None:
    probe = None if shm_pid is None else protocol.ShmProbe(pid=shm_pid, fd=3, token=b"t")
    message = protocol.Welcome(protocol.PROTOCOL_VERSION, "test", probe, max_request_frames)
    assert state.received(server, message, shm_reachable=shm_pid is not None) == Actions()


def chunk_of(
    rid: int, k: int, idxs: list[int], last: bool, shape: tuple[int, int, int] = (H, W, C), dtype: str = "|u1", slot: Optional[int] = None
) -> tuple[protocol.Chunk, Optional[memoryview]]:
    """A chunk as a server sends it: inline (header and payload) or in shared slot ``slot`` (header only)."""
    full = [len(idxs), *shape]
    if slot is not None:
        where = protocol.ShmSlot(slot=slot, fd=5, size=1 << 20)
        return protocol.Chunk(rid, k, last, idxs, dtype, full, shm=where), None
    nbytes = int(np.prod(full)) * np.dtype(dtype).itemsize
    return protocol.Chunk(rid, k, last, idxs, dtype, full), memoryview(bytes(nbytes))


def start(state: ClientState, idxs, fpc: int, video: Video = VIDEO) -> tuple[int, Actions]:
    rid = state.new_request_id()
    return rid, state.start_request(rid, video, idxs, fpc)


def sent(actions: Actions, kind: type) -> list[tuple[int, protocol.Message]]:
    """(server, message) of every message of type ``kind`` the actions send."""
    return [(s.server, s.message) for s in actions.send if isinstance(s.message, kind)]


def serve(state: ClientState, rid: int, idxs: list[int], fpc: int, servers: int) -> list[tuple[int, protocol.Chunk, memoryview]]:
    """Every chunk each server sends for a request of ``idxs`` dealt over ``servers``, in each server's order."""
    out = []
    shares = deal(np.asarray(idxs), fpc, servers)
    for j, share in enumerate(shares):
        pieces = [share[i : i + fpc].tolist() for i in range(0, len(share), fpc)] or [[]]
        for i, piece in enumerate(pieces):
            message, payload = chunk_of(rid, i, piece, i == len(pieces) - 1)
            out.append((j, message, payload))
    return out


def take_all(state: ClientState) -> tuple[list[list[int]], list[Actions]]:
    """Take every chunk that is ready, in order, as a driver does: check, then took."""
    got, actions = [], []
    while (arrival := state.next_ready()) is not None:
        assert state.check(arrival) == Actions()
        actions.append(state.took(arrival))
        got.append(list(arrival.message.frame_idxs))
    return got, actions


def raised(actions: Actions) -> AsyncFramesError:
    assert actions.error is not None, actions
    return actions.error


# -- dealing a request over servers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("servers", [1, 2, 3])
def test_chunk_k_goes_to_server_k_mod_n_and_every_index_is_asked_for_once(servers):
    idxs = np.arange(100, 123)  # 23 frames in chunks of 4: 6 chunks
    shares = deal(idxs, 4, servers)
    assert len(shares) == servers
    chunks = [idxs[k : k + 4].tolist() for k in range(0, 23, 4)]
    for j, share in enumerate(shares):
        assert share.tolist() == [i for c in chunks[j::servers] for i in c]
    assert sorted(np.concatenate(shares).tolist()) == idxs.tolist()


def test_a_request_shorter_than_the_servers_goes_only_to_the_servers_it_needs():
    assert [s.tolist() for s in deal(range(5), 4, 3)] == [[0, 1, 2, 3], [4]]
    assert [s.tolist() for s in deal(range(0), 4, 3)] == [[]]
    state = client(servers=3)
    assert state.servers_for(range(5), 4) == [0, 1]
    with pytest.raises(ValueError, match="frame count"):
        state.servers_for(None, 4)


@pytest.mark.parametrize("servers", [1, 2, 3])
def test_each_server_is_sent_its_share_with_the_window(servers):
    state = client(servers=servers, window=3)
    rid, actions = start(state, list(range(10)), 2)
    requests = sent(actions, protocol.Request)
    assert [server for server, _ in requests] == list(range(servers))
    for server, request in requests:
        assert request.request_id == rid and request.window == 3 and request.frames_per_chunk == 2
        share = protocol.selection_indices(request.frame_idxs, 0)
        if servers == 1:
            assert request.frame_idxs == protocol.frame_selection(list(range(10)))
        else:
            assert list(share) == deal(range(10), 2, servers)[server].tolist()
    assert actions.error is None and not actions.reset


def test_every_frame_from_one_server_is_asked_for_as_null():
    state = client()
    _rid, actions = start(state, None, 8)
    ((_, request),) = sent(actions, protocol.Request)
    assert request.frame_idxs is None


def test_an_empty_request_over_several_servers_is_done_without_asking_anyone():
    state = client(servers=2)
    _rid, actions = start(state, np.empty(0, np.int64), 4)
    assert sent(actions, protocol.Request) == []
    assert state.stream is not None and state.stream.done
    assert state.next_ready() is None


def test_an_empty_request_to_one_server_waits_for_its_one_empty_last_chunk():
    state = client()
    rid, _ = start(state, np.empty(0, np.int64), 4)
    assert not state.stream.done
    message, payload = chunk_of(rid, 0, [], True)
    state.received(0, message, payload)
    assert take_all(state) == ([[]], [Actions()])
    assert state.stream.done


def test_shared_memory_is_asked_for_only_where_the_probe_was_reached():
    assert sent(start(client(shm_pid=1234), [1], 1)[1], protocol.Request)[0][1].shm
    assert not sent(start(client(), [1], 1)[1], protocol.Request)[0][1].shm
    state = client(shm_pid=1234)
    state.shared_memory = False
    assert not sent(start(state, [1], 1)[1], protocol.Request)[0][1].shm


def test_a_request_over_a_servers_limit_is_refused_before_anything_is_sent():
    state = client(max_request_frames=5)
    rid, actions = start(state, list(range(6)), 2)
    assert isinstance(raised(actions), ServerError) and "6 frames exceeds the limit of 5" in str(actions.error)
    assert sent(actions, protocol.Request) == []
    assert state.stream is None
    error = state.ended_error(state.last)
    assert isinstance(error, RequestCancelledError) and f"request {rid} could not be sent (ServerError" in str(error)
    assert sent(start(state, list(range(5)), 2)[1], protocol.Request)  # at the limit: fine


# -- reassembly in order ------------------------------------------------------------------------------------------------


def test_chunks_are_handed_over_in_order_when_servers_answer_out_of_step():
    state = client(servers=3)
    idxs = list(range(20))
    rid, _ = start(state, idxs, 3)  # 7 chunks: server 0 has 0, 3, 6; server 1 has 1, 4; server 2 has 2, 5
    by_server = serve(state, rid, idxs, 3, 3)
    for server, message, payload in by_server:  # the last server first
        if server == 2:
            state.received(server, message, payload)
    assert state.next_ready() is None  # chunk 0 (server 0) is not here: nothing may overtake it
    for server, message, payload in by_server:
        if server != 2:
            state.received(server, message, payload)
    got, _ = take_all(state)
    assert got == [idxs[k : k + 3] for k in range(0, 20, 3)]
    assert state.stream.done


@settings(max_examples=200, deadline=None)
@given(
    idxs=st.lists(st.integers(0, 99), max_size=40),
    fpc=st.integers(1, 7),
    servers=st.integers(1, 3),
    data=st.data(),
)
def test_any_interleaving_of_arrivals_yields_every_chunk_in_order_once(idxs, fpc, servers, data):
    state = client(servers=servers)
    rid, _ = start(state, np.asarray(idxs, dtype=np.int64), fpc)
    queues: dict[int, list] = {}
    if idxs or servers == 1:  # an empty request over several servers asks nobody
        for server, message, payload in serve(state, rid, idxs, fpc, servers):
            queues.setdefault(server, []).append((message, payload))
    got: list[list[int]] = []
    credits = 0
    while any(queues.values()):
        server = data.draw(st.sampled_from(sorted(s for s, q in queues.items() if q)))
        message, payload = queues[server].pop(0)
        state.received(server, message, payload)
        more, actions = take_all(state)
        got += more
        credits += sum(len(sent(a, protocol.Credit)) for a in actions)
    expected = [idxs[k : k + fpc] for k in range(0, len(idxs), fpc)] or ([[]] if servers == 1 else [])
    assert got == expected
    assert state.stream.done
    # one credit per chunk taken, except each server's last
    assert credits == len(expected) - min(servers, len(expected))


# -- checks: a chunk must be the one asked for ----------------------------------------------------------------------------

LIES = {
    "wrong chunk number": lambda rid: [chunk_of(rid, 1, [1, 2], False)],
    "other indices": lambda rid: [chunk_of(rid, 0, [1, 9], False)],
    "float frames": lambda rid: [chunk_of(rid, 0, [1, 2], False, dtype="<f4")],
    "two channels": lambda rid: [chunk_of(rid, 0, [1, 2], False, shape=(H, W, 2))],
    "three-dimensional frames": lambda rid: [
        (protocol.Chunk(rid, 0, False, [1, 2], "|u1", [2, H, W]), memoryview(bytes(2 * H * W)))
    ],
    "a zero height": lambda rid: [chunk_of(rid, 0, [1, 2], False, shape=(0, W, C))],
    "a payload of the wrong size": lambda rid: [(chunk_of(rid, 0, [1, 2], False)[0], memoryview(bytes(7)))],
    "a shared slot never offered": lambda rid: [chunk_of(rid, 0, [1, 2], False, slot=1)],
    "a size that changes": lambda rid: [chunk_of(rid, 0, [1, 2], False), chunk_of(rid, 1, [3], True, shape=(H * 2, W, C))],
    "an early last chunk": lambda rid: [chunk_of(rid, 0, [1, 2], True)],
    "a late last chunk": lambda rid: [chunk_of(rid, 0, [1, 2], False), chunk_of(rid, 1, [3], False)],
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_chunk_that_differs_from_the_request_ends_it_with_a_protocol_error(lie):
    state = client()
    rid, _ = start(state, [1, 2, 3], 2)
    outcomes = []
    for message, payload in LIES[lie](rid):
        state.received(0, message, payload)
        arrival = state.next_ready()
        actions = state.check(arrival)
        outcomes.append(actions)
        if actions.error is None:
            state.took(arrival)
    assert isinstance(outcomes[-1].error, ProtocolError), lie
    assert all(a.error is None for a in outcomes[:-1])
    assert sent(outcomes[-1], protocol.Cancel) == [(0, protocol.Cancel(rid))]
    assert state.stream is None
    assert "failed (ProtocolError" in str(state.ended_error(state.last))


@pytest.mark.parametrize(
    "lie",
    [
        lambda rid: [chunk_of(rid, 0, [0, 2], False)],  # skips a frame
        lambda rid: [chunk_of(rid, 0, [0], False)],  # short, yet not the last
        lambda rid: [chunk_of(rid, 0, [0, 1, 2], False)],  # more than a chunk holds
        lambda rid: [chunk_of(rid, 0, [0, 1], False), chunk_of(rid, 1, [], True)],  # an empty chunk after the first
    ],
    ids=["skips", "short", "long", "empty after the first"],
)
def test_every_frame_requests_are_checked_against_the_frame_numbers(lie):
    state = client()
    rid, _ = start(state, None, 2)
    for message, payload in lie(rid):
        state.received(0, message, payload)
        arrival = state.next_ready()
        actions = state.check(arrival)
        if actions.error is None:
            state.took(arrival)
    assert isinstance(actions.error, ProtocolError)


def test_honest_chunks_pass_every_check():
    state = client()
    rid, _ = start(state, [1, 2, 3], 2, video=Video("gray.mp4", grayscale=True))
    state.received(0, *chunk_of(rid, 0, [1, 2], False, shape=(H, W, 1)))
    state.received(0, *chunk_of(rid, 1, [3], True, shape=(H, W, 1)))
    assert take_all(state)[0] == [[1, 2], [3]]
    state = client()
    rid, _ = start(state, None, 2)
    state.received(0, *chunk_of(rid, 0, [0, 1], False))
    state.received(0, *chunk_of(rid, 1, [2], True))
    assert take_all(state)[0] == [[0, 1], [2]]


def test_a_grayscale_request_refuses_rgb_frames():
    state = client()
    rid, _ = start(state, [1], 1, video=Video("gray.mp4", grayscale=True))
    state.received(0, *chunk_of(rid, 0, [1], True, shape=(H, W, 3)))
    assert isinstance(state.check(state.next_ready()).error, ProtocolError)


def test_a_shared_slot_chunk_passes_where_the_probe_was_reached():
    state = client(shm_pid=1234)
    rid, _ = start(state, [1, 2], 2)
    state.received(0, *chunk_of(rid, 0, [1, 2], True, slot=1))
    assert state.check(state.next_ready()) == Actions()


# -- credit and releases ----------------------------------------------------------------------------------------------------


def test_one_credit_per_chunk_taken_and_none_after_the_last():
    state = client()
    rid, _ = start(state, list(range(5)), 2)
    for message, payload in [chunk_of(rid, 0, [0, 1], False), chunk_of(rid, 1, [2, 3], False), chunk_of(rid, 2, [4], True)]:
        assert state.received(0, message, payload) == Actions()  # arriving earns nothing: taking does
    _got, actions = take_all(state)
    assert [sent(a, protocol.Credit) for a in actions] == [[(0, protocol.Credit(rid, 1))], [(0, protocol.Credit(rid, 1))], []]
    assert all(s.must for a in actions for s in a.send if isinstance(s.message, protocol.Credit))


def test_a_request_is_in_flight_until_its_last_chunk_is_taken_or_it_is_cancelled():
    """What another AsyncVideo of the thread asks before it sends this one's releases."""
    state = client()
    assert not state.in_flight
    rid, _ = start(state, list(range(3)), 2)
    assert state.in_flight
    for message, payload in [chunk_of(rid, 0, [0, 1], False), chunk_of(rid, 1, [2], True)]:
        state.received(0, message, payload)
    assert state.in_flight  # arrived, not taken
    take_all(state)
    assert not state.in_flight
    start(state, list(range(3)), 2)
    assert state.in_flight and sent(state.cancel(), protocol.Cancel) and not state.in_flight


def test_credit_goes_to_the_server_that_sent_the_chunk():
    state = client(servers=2)
    rid, _ = start(state, list(range(8)), 2)  # server 0: chunks 0, 2; server 1: chunks 1, 3
    for server, message, payload in serve(state, rid, list(range(8)), 2, 2):
        state.received(server, message, payload)
    _got, actions = take_all(state)
    assert [[server for server, _ in sent(a, protocol.Credit)] for a in actions] == [[0], [1], [], []]


def test_slots_let_go_of_are_released_before_the_next_credit():
    state = client(shm_pid=1234)
    rid, _ = start(state, list(range(4)), 1)
    state.received(0, *chunk_of(rid, 0, [0], False, slot=1))
    state.links[0].freed.append(7)  # the driver's mapping: the caller dropped its array over slot 7
    arrival = state.next_ready()
    state.check(arrival)
    actions = state.took(arrival)
    assert [type(s.message).__name__ for s in actions.send] == ["Release", "Credit"]
    assert actions.send[0].message == protocol.Release(slots=[7])
    assert not state.links[0].freed


def test_slots_let_go_of_by_the_end_of_an_iteration_are_released_then_and_on_goodbye():
    state = client(shm_pid=1234)
    state.links[0].freed.extend([4, 5])  # the caller dropped all but its last chunk
    actions = state.releases()
    assert sent(actions, protocol.Release) == [(0, protocol.Release(slots=[4, 5]))] and all(not s.must for s in actions.send)
    assert state.releases().send == ()  # nothing new: nothing sent
    state.links[0].freed.append(6)
    assert state.links[0].bye() == protocol.Bye(slots=[6]) and not state.links[0].freed


def test_chunks_nobody_will_look_at_have_their_slots_released():
    state = client(shm_pid=1234)
    rid, _ = start(state, list(range(4)), 1)
    state.received(0, *chunk_of(rid, 0, [0], False, slot=1))
    state.received(0, *chunk_of(rid, 1, [1], False, slot=2))
    actions = state.cancel()
    assert sent(actions, protocol.Cancel) == [(0, protocol.Cancel(rid))]
    assert sent(actions, protocol.Release) == [(0, protocol.Release(slots=[1, 2]))]
    assert all(not s.must for s in actions.send)
    state.received(0, *chunk_of(rid, 2, [2], False, slot=3))  # still in flight when we cancelled
    _rid, actions = start(state, [5], 1)
    assert sent(actions, protocol.Release) == [(0, protocol.Release(slots=[3]))]  # handed back with the next request


def replaced_in_flight(server_version: str) -> tuple[ClientState, int]:
    """A client of version 1.0 whose request (returned) has a chunk in slot 1 not taken yet,
    served by a server of ``server_version``."""
    state = ClientState(["tcp://server0:9010"], window=2, version="1.0")
    probe = protocol.ShmProbe(pid=1234, fd=3, token=b"t")
    state.received(0, protocol.Welcome(protocol.PROTOCOL_VERSION, server_version, probe, None), shm_reachable=True)
    rid, _ = start(state, list(range(4)), 1)
    state.received(0, *chunk_of(rid, 0, [0], False, slot=1))
    return state, rid


def test_to_a_server_of_our_version_a_new_request_carries_the_cancel_and_the_release():
    state, rid = replaced_in_flight("1.0")
    state.links[0].freed.append(7)  # the caller let go of a chunk in slot 7
    new, actions = start(state, [5, 6], 1)
    assert [type(s.message).__name__ for s in actions.send] == ["Request"]  # one message, not three
    (send,) = actions.send
    assert send.must and send.message.request_id == new and send.message.replaces == rid
    assert sorted(send.message.release) == [1, 7]  # the chunk nobody took, and the one let go of
    assert not state.links[0].freed


def test_to_a_server_of_another_version_the_cancel_and_the_release_go_apart():
    state, _rid = replaced_in_flight("0.9")
    _new, actions = start(state, [5, 6], 1)
    assert [type(s.message).__name__ for s in actions.send] == ["Cancel", "Release", "Request"]
    assert actions.send[2].message.replaces is None and actions.send[2].message.release == []


def test_a_request_with_nothing_to_cancel_or_release_is_sent_as_it_was():
    state = ClientState(["tcp://server0:9010"], window=2, version="1.0")
    state.received(0, protocol.Welcome(protocol.PROTOCOL_VERSION, "1.0", None, None))
    _rid, actions = start(state, [1, 2], 1)
    (send,) = actions.send
    assert send.message.replaces is None and send.message.release == []
    assert "replaces" not in protocol.converter.unstructure(send.message)  # absent on the wire: older servers accept it


# -- request ids and replies --------------------------------------------------------------------------------------------------


def test_replies_are_filed_under_their_request_and_late_ones_dropped():
    state = client()
    first, second = state.new_request_id(), state.new_request_id()
    assert first != second
    state.expect(first)
    assert state.busy(0)
    state.received(0, protocol.Pong(second, "x"))  # nobody asked: dropped
    assert state.reply(second) is None
    state.received(0, protocol.Pong(first, "x"))
    assert state.reply(first) == protocol.Pong(first, "x")
    assert state.reply(first) is None  # taken
    state.abandon(first)
    state.expect(second)
    state.abandon(second)  # e.g. it timed out
    state.received(0, protocol.Error(second, "VideoOpenError", "late"))
    assert state.reply(second) is None
    assert not state.busy(0)


def test_an_error_for_an_info_request_is_its_reply():
    state = client()
    rid = state.new_request_id()
    state.expect(rid)
    assert state.received(0, protocol.Error(rid, "VideoOpenError", "not a video")) == Actions()
    assert state.reply(rid) == protocol.Error(rid, "VideoOpenError", "not a video")


def test_an_error_about_the_connection_is_raised():
    state = client()
    error = raised(state.received(0, protocol.Error(None, "ProtocolError", "too many messages")))
    assert isinstance(error, ProtocolError) and "too many messages" in str(error)


def test_chunks_of_an_old_request_or_from_a_server_not_asked_are_dropped():
    state = client(servers=2, shm_pid=1234)
    rid, _ = start(state, [1], 1)  # one chunk: server 0 only
    state.received(1, *chunk_of(rid, 0, [1], True, slot=4))
    state.received(0, *chunk_of(rid + 100, 0, [1], True, slot=5))
    assert state.next_ready() is None
    assert list(state.links[1].freed) == [4] and list(state.links[0].freed) == [5]


# -- how a request ends, and what iterating it afterwards raises --------------------------------------------------------------


def test_the_errors_after_a_request_ended_say_why():
    state = client()
    assert "no request to iterate" in str(state.ended_error(None))
    rid, _ = start(state, [1, 2], 1)
    state.received(0, *chunk_of(rid, 0, [1], False))
    take_all(state)
    state.cancel()
    error = state.ended_error(state.last)
    assert isinstance(error, RequestCancelledError)
    assert f"request {rid} was cancelled by cancel() after 1 of its chunks were delivered" in str(error)

    old, _ = start(state, [1, 2], 1)
    old_stream = state.stream
    new, actions = start(state, [3], 1)
    assert sent(actions, protocol.Cancel) == [(0, protocol.Cancel(old))]
    assert f"request {old} was replaced by request {new} (load_by_chunk)" in str(state.ended_error(old_stream))

    state.received(0, *chunk_of(new, 0, [3], True))
    take_all(state)
    done = state.ended_error(state.stream)
    assert not isinstance(done, RequestCancelledError) and "fully consumed: all 1 of its chunks" in str(done)
    assert state.cancel() == Actions()  # a finished request is not cancelled: nothing to tell the server
    assert "fully consumed" in str(state.ended_error(state.last))
    state.closed = True
    assert "closed" in str(state.ended_error(state.last))


def test_a_request_that_could_not_be_sent_says_so_when_iterated():
    state = client(servers=2)
    start(state, list(range(8)), 2)
    new = state.new_request_id()
    assert sent(state.replace(new), protocol.Cancel)  # the old one ends first ...
    state.not_sent(new, "could not be sent (VideoNotFoundError: no such file)")  # ... then learning the frame count failed
    error = state.ended_error(state.last)
    assert isinstance(error, RequestCancelledError)
    assert f"request {new} could not be sent (VideoNotFoundError: no such file) after 0 of its chunks" in str(error)
    rid, _ = start(state, list(range(8)), 2)
    sends = state.not_sent(rid, "could not be sent (RequestTimeoutError: ...)")  # sent to some servers, then not
    assert sorted(server for server, _ in sent(sends, protocol.Cancel)) == [0, 1]
    assert state.stream is None and f"request {rid} could not be sent" in str(state.ended_error(state.last))


def test_a_servers_error_ends_the_request_and_is_raised_as_its_class():
    state = client(servers=2)
    rid, _ = start(state, list(range(8)), 2)
    state.received(0, protocol.Error(rid, "FrameIndexError", "frame 150 is out of range"))
    actions = state.check(state.next_ready())
    assert isinstance(raised(actions), FrameIndexError)
    assert sorted(server for server, _ in sent(actions, protocol.Cancel)) == [0, 1]
    assert "failed (FrameIndexError: frame 150 is out of range)" in str(state.ended_error(state.last))
    assert state.stream is None


def test_a_chunk_that_cannot_be_read_fails_the_request():
    state = client()
    rid, _ = start(state, [1], 1)
    actions = state.fail(VideoOpenError("gone"))
    assert isinstance(actions.error, VideoOpenError) and sent(actions, protocol.Cancel) == [(0, protocol.Cancel(rid))]


# -- connection health ------------------------------------------------------------------------------------------------------------


def test_a_refused_curve_key_is_an_authentication_error():
    state = ClientState(["tcp://s:1"])
    error = raised(state.connection_event(0, ConnectionEvent.AUTH_FAILED, busy=False))
    assert isinstance(error, AuthenticationError) and "refused our CURVE credentials" in str(error)


def test_a_failed_handshake_before_any_greeting_is_an_authentication_error():
    state = ClientState(["tcp://s:1"])
    error = raised(state.connection_event(0, ConnectionEvent.HANDSHAKE_FAILED, busy=False))
    assert isinstance(error, AuthenticationError) and "security settings differ" in str(error)


def test_a_failed_handshake_after_a_greeting_replaces_the_socket():
    """A reconnect met something else (e.g. the kernel connected a free port to ourselves): try again."""
    state = client()
    actions = state.connection_event(0, ConnectionEvent.HANDSHAKE_FAILED, busy=True)
    assert actions == Actions(reset=(0,))
    assert state.links[0].health is Health.NEW and state.links[0].generation == 1


def test_health_goes_new_connected_greeted():
    state = ClientState(["tcp://s:1"])
    link = state.links[0]
    assert link.health is Health.NEW
    assert state.connection_event(0, ConnectionEvent.CONNECTED, busy=False) == Actions()
    assert link.health is Health.CONNECTED
    welcome(state, 0)
    assert link.health is Health.GREETED and link.ever_greeted
    assert state.connection_event(0, ConnectionEvent.CONNECTED, busy=False) == Actions()  # late news changes nothing
    assert link.health is Health.GREETED


def test_a_lost_connection_while_busy_is_a_server_died_error_and_ends_the_request():
    state = client(servers=2)
    rid, _ = start(state, list(range(8)), 2)
    state.received(0, *chunk_of(rid, 0, [0, 1], False))
    actions = state.connection_event(0, ConnectionEvent.LOST, busy=state.busy(0))
    assert isinstance(raised(actions), ServerDiedError) and not isinstance(actions.error, ServerShutdownError)
    assert "lost the connection to the frame server at tcp://server0:9010" in str(actions.error)
    assert actions.reset == (0,)
    assert sent(actions, protocol.Cancel) == [(1, protocol.Cancel(rid))]  # only the server still there hears of it
    assert state.stream is None and "was lost with its server" in str(state.ended_error(state.last))


def test_a_lost_connection_whose_last_words_were_a_shutdown_is_a_shutdown_error():
    state = client()
    start(state, [1, 2], 1)
    actions = state.connection_event(0, ConnectionEvent.LOST, busy=True, leftovers=[protocol.Shutdown("terminated")])
    assert isinstance(raised(actions), ServerShutdownError) and "shut down: terminated" in str(actions.error)


def test_a_lost_connection_while_idle_or_never_made_only_replaces_the_socket():
    state = client()
    assert state.connection_event(0, ConnectionEvent.LOST, busy=False) == Actions(reset=(0,))
    start(state, [1], 1)  # busy now, but the new socket never connected: nothing was lost
    assert state.connection_event(0, ConnectionEvent.LOST, busy=True) == Actions(reset=(0,))


def test_a_shutdown_while_busy_is_a_shutdown_error_and_while_idle_only_a_reset():
    state = client()
    rid, _ = start(state, [1, 2], 1)
    actions = state.received(0, protocol.Shutdown("terminated"))
    assert isinstance(raised(actions), ServerShutdownError) and actions.reset == (0,)
    assert "ended when its server shut down" in str(state.ended_error(state.last))
    assert sent(actions, protocol.Cancel) == []  # that connection is gone: nothing for it
    welcome(state, 0)
    assert state.received(0, protocol.Shutdown("terminated")) == Actions(reset=(0,))


# -- reconnecting: the next message is a hello, nothing old gets through ----------------------------------------------------------


def test_after_a_lost_connection_the_next_message_is_a_hello_on_the_new_generation():
    state = client(shm_pid=1234)
    rid, _ = start(state, list(range(6)), 1)
    state.received(0, *chunk_of(rid, 0, [0], False, slot=1))
    arrival = state.next_ready()
    state.check(arrival)
    (credit,) = [s for s in state.took(arrival).send if isinstance(s.message, protocol.Credit)]
    assert state.admit(credit) is Admit.SEND
    state.received(0, *chunk_of(rid, 1, [1], False, slot=2))
    state.connection_event(0, ConnectionEvent.LOST, busy=False)
    link = state.links[0]
    assert link.generation == 1 and not link.inbox and not link.freed and link.shm_pid is None
    assert state.admit(credit) is Admit.DROP  # queued for the old connection: never delivered
    assert state.cancel().send == ()  # nothing for a connection that has not said hello
    assert state.admit(Send(0, 1, protocol.Release(slots=[1]))) is Admit.DROP
    assert state.admit(Send(0, 0, protocol.Request(9, VIDEO, [1]))) is Admit.GREET_FIRST
    assert state.admit(Send(0, 0, protocol.Ping(9))) is Admit.GREET_FIRST
    assert state.admit(Send(0, 1, link.hello("me"))) is Admit.SEND
    welcome(state, 0)
    assert state.admit(credit) is Admit.DROP  # still the old connection's
    _rid, actions = start(state, [1], 1)
    assert [type(s.message).__name__ for s in actions.send] == ["Request"]
    assert all(s.generation == 1 and state.admit(s) is Admit.SEND for s in actions.send)


def test_nothing_is_sent_after_close():
    state = client()
    start(state, [1, 2], 1)
    state.closed = True
    assert state.cancel().send == ()


# -- iterating: never ends silently ----------------------------------------------------------------------------------------------


def test_an_iteration_ends_once_at_the_last_chunk_and_the_next_one_says_why():
    state = client()
    with pytest.raises(AsyncFramesError, match="no request to iterate"):
        state.iteration_start()
    rid, _ = start(state, [1, 2], 2)
    stream = state.iteration_start()
    assert not state.iteration_over(stream)
    state.received(0, *chunk_of(rid, 0, [1, 2], True))
    take_all(state)
    assert state.iteration_over(stream)
    with pytest.raises(AsyncFramesError, match=f"request {rid} was fully consumed: all 1 of its chunks"):
        state.iteration_start()


def test_an_empty_request_is_empty_once():
    state = client(servers=2)
    start(state, np.empty(0, np.int64), 4)
    assert state.iteration_over(state.iteration_start())
    with pytest.raises(AsyncFramesError, match="fully consumed"):
        state.iteration_start()


def test_an_iteration_of_a_replaced_request_raises_why_it_ended():
    state = client()
    old, _ = start(state, [1, 2, 3], 1)
    stream = state.iteration_start()
    state.received(0, *chunk_of(old, 0, [1], False))
    take_all(state)
    new, _ = start(state, [5], 1)
    with pytest.raises(RequestCancelledError, match=f"request {old} was replaced by request {new} .* after 1 of its chunks"):
        state.iteration_over(stream)
    assert not state.iteration_over(state.iteration_start())  # the new one is fine


@pytest.mark.parametrize("servers", [1, 3])
def test_chunks_left_counts_down_to_zero_as_chunks_are_taken(servers):
    state = client(servers)
    idxs = list(range(0, 100, 3))  # 34 frames: 4 chunks of 10
    rid, _ = start(state, idxs, 10)
    assert state.stream.chunks_left() == 4
    left = []
    for server, message, payload in sorted(serve(state, rid, idxs, 10, servers), key=lambda s: s[1].frame_idxs[0]):
        state.received(server, message, payload)
        take_all(state)
        left.append(state.stream.chunks_left())
    assert left == [3, 2, 1, 0]


def test_chunks_left_of_every_frame_needs_the_frame_count():
    state = client()
    start(state, None, 30)
    assert state.stream.chunks_left() is None
    assert state.stream.chunks_left(frame_count=80) == 3


def test_a_frame_times_reply_is_filed_under_its_request():
    state = client()
    rid = state.new_request_id()
    state.expect(rid)
    reply = protocol.FrameTimesReply(rid, pts_seconds=protocol.times_bytes([0.5]), duration_seconds=protocol.times_bytes([0.1]))
    assert state.received(0, reply) == Actions()
    assert state.reply(rid) == reply
    state.received(0, protocol.FrameTimesReply(rid + 1, b"", b""))  # nobody asked: dropped
    assert state.reply(rid + 1) is None


def test_a_lost_servers_frames_not_taken_yet_go_to_the_servers_still_up():
    state = client(3)
    idxs = list(range(40))
    rid, _ = start(state, idxs, 4)  # 10 chunks: k from server k mod 3
    for server, message, payload in sorted(serve(state, rid, idxs, 4, 3), key=lambda s: s[1].frame_idxs[0])[:4]:
        state.received(server, message, payload)
    take_all(state)  # chunks 0-3 taken
    stream = state.stream
    state.connection_event(1, ConnectionEvent.LOST, busy=True)  # server 1 is gone
    remaining, survivors = state.fail_over(stream)
    assert list(remaining) == list(range(16, 40)) and survivors == [0, 2]
    rid2 = state.new_request_id()
    actions = state.start_request(rid2, VIDEO, remaining, 4, survivors)
    asked = {server: message for server, message in sent(actions, protocol.Request)}
    assert set(asked) == {0, 2}  # nothing for the lost server
    assert state.up() == [0, 2]  # new requests leave it out until it answers again
    welcome(state, 1)
    assert state.up() == [0, 1, 2]


def test_there_is_no_failing_over_with_one_server_or_none_left():
    single = client(1)
    start(single, list(range(8)), 4)
    assert single.fail_over(single.stream) is None
    pair = client(2)
    start(pair, list(range(8)), 4)
    stream = pair.stream
    for i in range(2):
        pair.connection_event(i, ConnectionEvent.LOST, busy=True)
    assert pair.fail_over(stream) is None


def test_a_server_that_does_not_know_a_greeted_connection_is_a_lost_one():
    """ZeroMQ reconnects to a restarted server at the same endpoint by itself; the new process
    answers our next message with UnknownClientError: the connection we had is gone."""
    state = client(servers=2)
    rid, _ = start(state, list(range(16)), 4)
    error = protocol.Error(None, "UnknownClientError", "send hello before anything else")
    actions = state.received(1, error)
    assert actions.reset == (1,) and isinstance(raised(actions), ServerDiedError)
    assert not state.links[1].greeted and state.up() == [0]
    fresh = client()  # not greeted yet: the error is the server's to report, as it is
    fresh.links[0].reset()
    assert isinstance(raised(fresh.received(0, error)), ProtocolError)
