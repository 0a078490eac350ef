"""The server's rules, driven directly on :class:`asyncframes._server_state.ServerState`.

No sockets, processes, clocks or logs: messages go in as raw parts, the time is a number,
and the actions that come out are the server's decisions. Each test names one rule.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncframes import _protocol as protocol
from asyncframes._config import MiB, ServerConfig
from asyncframes._protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Credit,
    Error,
    FrameTimesReply,
    FrameTimesRequest,
    Hello,
    InfoReply,
    InfoRequest,
    Ping,
    Pong,
    Release,
    Request,
    ShmProbe,
    Shutdown,
    Welcome,
)
from asyncframes._server_actions import (
    Decode,
    ForgetClient,
    ForgetRequest,
    ForgetVideo,
    FreeBuffers,
    OpenVideo,
    ReadAround,
    ReleaseMemory,
    ResizeCache,
    Send,
    Stop,
    VideoFacts,
)
from asyncframes._server_state import (
    BUFFERS_IDLE_S,
    CACHE_IDLE_S,
    CLIENT_QUEUE,
    CLIENT_SHARE,
    DISCARDS_BEFORE_DISCONNECT,
    READ_AROUND_DELAY_S,
    ROOM_RETRY_S,
    TRIM_AFTER_DISCARDS,
    TRIM_EVERY_S,
    ServerState,
    SlotBook,
    wire_error,
)
from asyncframes._times import frame_times
from asyncframes._video import Video, VideoInfo
from asyncframes.errors import FrameIndexError, VideoDecodeError, VideoNotFoundError

pytestmark = pytest.mark.pure

A, B, C = b"client-a", b"client-b", b"client-c"
#: A small video: 100 frames of 4 x 4 RGB (48 bytes each).
FACTS = VideoFacts(frame_count=100, grayscale=False, frame_shape=(4, 4, 3), identity=("v", 1))
FRAME_BYTES = 48
OFFER = ShmProbe(pid=1234, fd=7, token=b"t" * 16)
#: The small video's frame times: 100 frames at 25 fps starting at 1 s.
TIMES = frame_times(list(range(25, 125)), Fraction(1, 25), Fraction(25), num_frames_from_header=102)


def parts(message: Any) -> list[bytes]:
    return [protocol.encode(message)]


class Harness:
    """A ServerState with a fake clock and a driver that opens every video with ``facts``."""

    def __init__(self, facts: "VideoFacts | BaseException" = FACTS, shm: bool = False, **config: Any) -> None:
        self.facts = facts
        self.now = 0.0
        root = config.get("root")
        self.state = ServerState(
            ServerConfig(**config), version="9.9", shm_offer=OFFER if shm else None, root_spellings=(root,) if root else ()
        )

    def send(self, client: bytes, *messages: Any) -> list[Any]:
        """Queue ``messages`` from ``client`` and handle rounds until its queue is empty;
        videos open at once. Returns every action other than OpenVideo."""
        for message in messages:
            assert self.state.receive(client, parts(message) if not isinstance(message, list) else message)
        return self.rounds()

    def rounds(self) -> list[Any]:
        out: list[Any] = []
        while self.state.has_messages and not self.state.stopping:
            out += self.carry(self.state.handle_round(self.now))
        return out

    def carry(self, actions: list[Any]) -> list[Any]:
        out = []
        for action in actions:
            if isinstance(action, OpenVideo):
                facts = self.facts
                if action.info and isinstance(facts, VideoFacts):
                    facts = attrs.evolve(facts, info=video_info())
                if action.frame_times and isinstance(facts, VideoFacts) and facts.frame_times is None:
                    facts = attrs.evolve(facts, frame_times=TIMES)
                out += self.carry(self.state.video_opened(action.ticket, facts, self.now))
            else:
                out.append(action)
        return out

    def hello(self, *clients: bytes) -> None:
        for client in clients:
            (welcome,) = self.send(client, Hello(version=PROTOCOL_VERSION))
            assert isinstance(welcome.message, Welcome)

    def request(self, client: bytes, rid: int, idxs: Any = range(10), fpc: int = 2, window: int = 2, shm: bool = False) -> list[Any]:
        return self.send(client, Request(rid, Video("v.mp4"), idxs, frames_per_chunk=fpc, window=window, shm=shm))

    def chunk(self, queued: Optional[dict[bytes, int]] = None) -> Optional[tuple[Decode, Chunk, list[Any]]]:
        """Decode and send the next chunk, if any: (decode, chunk message, other actions)."""
        decode = self.state.next_chunk(self.now, queued or {})
        if decode is None:
            return None
        if decode.slot is not None and decode.slot.new:
            self.state.slot_made(decode, 100 + decode.slot.slot)
        actions = self.state.chunk_decoded(decode, self.now)
        (send,) = [a for a in actions if isinstance(a, Send)]
        assert isinstance(send.message, Chunk) and send.client == decode.client
        assert send.payload == (decode.slot is None)
        return decode, send.message, [a for a in actions if a is not send]

    def chunks(self, limit: int = 1000) -> list[tuple[bytes, Chunk]]:
        out = []
        while len(out) < limit:
            got = self.chunk()
            if got is None:
                return out
            out.append((got[0].client, got[1]))
        return out


def video_info() -> VideoInfo:
    return VideoInfo("/srv/v.mp4", 100, 4, 4, 3, False, 25.0, "h264", "yuv420p", "mp4")


def errors(actions: list[Any]) -> list[Error]:
    return [a.message for a in actions if isinstance(a, Send) and isinstance(a.message, Error)]


def only_error(actions: list[Any]) -> Error:
    (error,) = errors(actions)
    return error


# -- handshake ---------------------------------------------------------------------------------


def test_nothing_but_ping_is_served_before_hello():
    h = Harness()
    (pong,) = h.send(A, Ping(request_id=5))
    assert pong.message == Pong(request_id=5, server="9.9")
    error = only_error(h.request(A, 1))
    assert (error.error, error.request_id) == ("UnknownClientError", None) and "hello" in error.message
    assert h.state.requests_of(A) == []


def test_hello_with_another_version_is_refused_naming_both_versions():
    h = Harness()
    error = only_error(h.send(A, Hello(version=PROTOCOL_VERSION + 1)))
    assert error.error == "ProtocolError"
    assert str(PROTOCOL_VERSION + 1) in error.message and str(PROTOCOL_VERSION) in error.message and "9.9" in error.message
    assert only_error(h.request(A, 1)).error == "UnknownClientError"  # still no hello (a ProtocolError)


def test_welcome_offers_shared_memory_and_the_request_limit():
    h = Harness(shm=True, max_request_frames=77)
    (welcome,) = h.send(A, Hello(version=PROTOCOL_VERSION))
    assert welcome.message == Welcome(version=PROTOCOL_VERSION, server="9.9", shm=OFFER, max_request_frames=77)


def test_malformed_messages_and_extra_parts_get_a_protocol_error_and_nothing_else_changes():
    h = Harness()
    h.hello(A)
    for bad, complaint in [([b"\xc1"], "msgpack"), ([protocol.encode(Ping()), b"x"], "expected 1 part, got 2"), ([b"\x01"], "map")]:
        error = only_error(h.send(A, bad))
        assert (error.error, error.request_id) == ("ProtocolError", None) and complaint in error.message
    assert h.request(A, 1) == [] and h.state.requests_of(A) == [1]


def test_server_messages_and_stop_are_refused_unless_stop_is_allowed():
    h = Harness()
    h.hello(A)
    assert only_error(h.send(A, Pong())).error == "ProtocolError"
    assert "does not accept stop" in only_error(h.send(A, protocol.Stop())).message
    h = Harness(allow_stop=True)
    h.hello(A)
    assert h.send(A, protocol.Stop(), Ping()) == [Stop("a client asked it to stop")]  # nothing after stop
    assert h.state.stopping


def test_info_opens_the_video_and_names_it_as_the_client_did():
    h = Harness()
    h.hello(A)
    (reply,) = h.send(A, InfoRequest(3, Video("v.mp4")))
    assert isinstance(reply.message, InfoReply) and reply.message.request_id == 3
    assert reply.message.info.filename == "v.mp4" and reply.message.info.frame_count == 100


# -- limits -----------------------------------------------------------------------------------


def test_each_limit_refuses_a_request_with_its_error():
    h = Harness(max_requests_per_client=2, max_frames_per_chunk=8, max_request_frames=50, max_chunk_bytes=5 * FRAME_BYTES)
    h.hello(A)
    assert h.request(A, 1) == []
    assert "already in use" in only_error(h.request(A, 1)).message
    assert "frames_per_chunk 9 exceeds" in only_error(h.request(A, 2, fpc=9)).message
    assert "60 frames exceeds" in only_error(h.request(A, 2, idxs=range(60))).message
    assert "100 frames exceeds" in only_error(h.request(A, 2, idxs=None)).message  # counted once opened
    error = only_error(h.request(A, 2, idxs=[3, 100]))
    assert (error.error, error.request_id) == ("FrameIndexError", 2) and "frame index 100 is out of range" in error.message
    assert "over this server's limit" in only_error(h.request(A, 2, fpc=6, idxs=range(20))).message
    assert h.request(A, 2) == []
    assert "too many concurrent requests" in only_error(h.request(A, 3)).message
    assert h.state.requests_of(A) == [1, 2]


def test_a_request_over_the_frame_limit_is_refused_before_its_video_is_opened():
    h = Harness(max_request_frames=5)
    h.hello(A)
    assert h.state.receive(A, parts(Request(1, Video("v.mp4"), range(6))))
    actions = h.state.handle_round(0.0)
    assert not any(isinstance(a, OpenVideo) for a in actions) and only_error(actions).error == "ServerError"


def test_a_video_that_fails_to_open_refuses_the_request_with_its_error_and_the_root_hidden():
    h = Harness(VideoNotFoundError("/srv/videos/v.mp4 does not exist"), root="/srv/videos")
    h.hello(A)
    error = only_error(h.request(A, 4))
    assert (error.error, error.request_id) == ("VideoNotFoundError", 4)
    assert "/srv/videos" not in error.message and "v.mp4" in error.message


def test_a_chunk_must_fit_the_chunk_and_inline_caps():
    for cap in ("max_chunk_bytes", "client_inline_bytes", "max_inline_bytes"):
        h = Harness(**{cap: 3 * FRAME_BYTES})
        h.hello(A)
        assert "ask for fewer frames per chunk" in only_error(h.request(A, 1, fpc=4)).message
        assert h.request(A, 2, fpc=3) == []


# -- credit, window, fairness ------------------------------------------------------------------


def test_no_chunk_goes_without_credit_and_each_credit_lets_one_more_go():
    h = Harness()
    h.hello(A)
    h.request(A, 1, idxs=range(20), fpc=2, window=3)
    assert [c.chunk for _, c in h.chunks()] == [0, 1, 2]
    assert h.state.next_chunk(h.now, {}) is None
    h.send(A, Credit(1, 1))
    assert [c.chunk for _, c in h.chunks()] == [3]


def test_credit_is_capped_at_the_server_window():
    h = Harness(max_window=4)
    h.hello(A)
    h.request(A, 1, idxs=range(100), fpc=1, window=50)
    assert h.state.credit_of(A, 1) == 4
    h.send(A, Credit(1, 1_000_000))
    assert h.state.credit_of(A, 1) == 4 and len(h.chunks()) == 4


def test_chunks_come_in_order_with_their_frames_and_the_last_ends_the_request():
    h = Harness()
    h.hello(A)
    h.request(A, 1, idxs=[5, 1, 9, 9, 0], fpc=2, window=8)
    got = h.chunks()
    assert [(c.chunk, c.frame_idxs, c.last_chunk, c.shape) for _, c in got] == [
        (0, [5, 1], False, [2, 4, 4, 3]),
        (1, [9, 9], False, [2, 4, 4, 3]),
        (2, [0], True, [1, 4, 4, 3]),
    ]
    assert h.state.requests_of(A) == []


def test_an_empty_request_gets_one_empty_last_chunk():
    h = Harness()
    h.hello(A)
    h.request(A, 1, idxs=[])
    ((_, chunk),) = h.chunks()
    assert chunk.last_chunk and chunk.frame_idxs == [] and chunk.shape == [0, 4, 4, 3]


def test_chunks_go_round_robin_over_requests_and_clients():
    h = Harness()
    h.hello(A, B)
    h.request(A, 1, idxs=range(100), window=8)
    h.request(A, 2, idxs=range(100), window=8)
    h.request(B, 1, idxs=range(100), window=8)
    order = [(client, c.request_id) for client, c in h.chunks(9)]
    assert order == [(A, 1), (A, 2), (B, 1)] * 3


def test_a_request_without_credit_is_skipped_and_others_go_on():
    h = Harness()
    h.hello(A, B)
    h.request(A, 1, idxs=range(100), window=1)
    h.request(B, 1, idxs=range(100), window=5)
    assert [client for client, _ in h.chunks()] == [A, B, B, B, B, B]


# -- floods and fair rounds --------------------------------------------------------------------


def test_a_flooding_client_is_dropped_and_silenced_while_others_are_served():
    h = Harness()
    h.hello(A, B)
    h.request(A, 1, idxs=range(100))
    for _ in range(CLIENT_QUEUE + 1):
        assert h.state.receive(A, parts(Ping()))
    assert h.state.receive(B, parts(Ping(request_id=2)))
    actions = h.state.handle_round(h.now)
    to_a = [a for a in actions if getattr(a, "client", None) == A]
    assert [type(a) for a in to_a] == [Send, ForgetClient] and "more messages" in only_error(to_a).message
    assert [a.message for a in actions if getattr(a, "client", None) == B] == [Pong(request_id=2, server="9.9")]
    assert h.state.requests_of(A) == [] and A not in h.state.clients
    assert not h.state.receive(A, parts(Ping()))  # silenced: thrown away unread
    assert not h.state.has_messages


def test_a_client_queueing_more_bytes_than_two_of_the_largest_requests_is_dropped():
    h = Harness(max_request_frames=1000)
    limit = h.state.inbox_bytes_limit
    big = [b"x" * (limit // 3)]
    assert all(h.state.receive(A, big) for _ in range(3))
    assert h.state.queued_bytes(A) <= limit and h.state.queued_messages(A) == 3
    assert h.state.receive(A, big)  # over: the queue becomes the drop marker
    assert h.state.queued_messages(A) == 1 and h.state.queued_bytes(A) == 0
    assert "more messages" in only_error(h.rounds()).message


def test_each_round_handles_one_share_of_every_clients_queue():
    h = Harness()
    h.hello(A, B, C)
    for k in range(40):
        h.state.receive(A, parts(Ping(request_id=k)))
    h.state.receive(B, parts(Ping(request_id=1)))
    h.state.receive(C, parts(InfoRequest(1, Video("v.mp4"))))
    h.state.receive(C, parts(Ping(request_id=2)))
    first = h.carry(h.state.handle_round(h.now))
    by_client = {client: [a for a in first if a.client == client] for client in (A, B, C)}
    assert len(by_client[A]) == CLIENT_SHARE and len(by_client[B]) == 1
    assert [type(a.message) for a in by_client[C]] == [InfoReply]  # an info takes the whole share
    second = h.carry(h.state.handle_round(h.now))
    assert [a.message.request_id for a in second if a.client == C] == [2]


# -- cancel ------------------------------------------------------------------------------------


def test_a_queued_cancel_is_seen_between_frames_and_ends_the_request():
    h = Harness()
    h.hello(A)
    h.request(A, 1, idxs=range(100))
    h.request(A, 2, idxs=range(100))
    decode = h.state.next_chunk(h.now, {})
    assert decode.request_id == 1 and not h.state.cancel_queued(A, 1)
    h.state.receive(A, parts(Ping()))
    h.state.receive(A, parts(Cancel(2)))
    assert not h.state.cancel_queued(A, 1)  # another request's cancel, or other messages: go on
    h.state.receive(A, parts(Cancel(1)))
    assert h.state.cancel_queued(A, 1)
    assert h.state.chunk_interrupted(decode, h.now) == []
    actions = h.rounds()
    assert [a for a in actions if isinstance(a, ForgetRequest)] == [ForgetRequest(A, 2), ForgetRequest(A, 1)]
    assert h.state.requests_of(A) == [] and h.state.next_chunk(h.now, {}) is None
    assert h.state.chunk_decoded(decode, h.now) == []  # a late outcome of a cancelled request is ignored


def test_a_flood_queued_while_decoding_interrupts_the_chunk():
    h = Harness()
    h.hello(A)
    h.request(A, 1)
    h.state.next_chunk(h.now, {})
    for _ in range(CLIENT_QUEUE + 1):
        h.state.receive(A, parts(Ping()))
    assert h.state.cancel_queued(A, 1)


def test_cancel_credit_and_release_of_unknown_ids_are_ignored():
    h = Harness()
    h.hello(A)
    assert h.send(A, Cancel(9), Credit(9, 3), Release([1, 2, 3])) == []


def test_a_cancel_while_the_video_opens_drops_the_request():
    h = Harness()
    h.hello(A)
    h.state.receive(A, parts(Request(1, Video("v.mp4"), range(4))))
    (open_video,) = h.state.handle_round(h.now)
    h.send(A, Cancel(1))
    assert h.state.video_opened(open_video.ticket, FACTS, h.now) == [] and h.state.requests_of(A) == []


# -- inline caps and window bytes --------------------------------------------------------------


def test_a_client_with_its_windows_of_bytes_queued_waits_while_others_are_served():
    h = Harness()
    h.hello(A, B)
    h.request(A, 1, idxs=range(100), fpc=2, window=2)
    h.request(B, 1, idxs=range(100), fpc=2, window=2)
    window = 2 * 2 * FRAME_BYTES
    assert h.state.window_bytes(A) == window
    h.send(A, Credit(1, 2))  # a liar: credits chunks it never read
    queued = {A: window}
    picked = [h.state.next_chunk(h.now, queued) for _ in range(2)]
    assert [d.client for d in picked if d is not None] == [B]
    assert h.state.wait_s(h.now, queued) == pytest.approx(ROOM_RETRY_S)


def test_the_server_wide_inline_cap_holds_for_everyone():
    h = Harness(max_inline_bytes=5 * FRAME_BYTES)
    h.hello(A, B)
    h.request(A, 1, idxs=range(100), fpc=2)
    h.request(B, 1, idxs=range(100), fpc=2)
    assert h.state.next_chunk(h.now, {A: 2 * FRAME_BYTES, B: 2 * FRAME_BYTES}) is None
    assert h.state.next_chunk(h.now, {A: 2 * FRAME_BYTES, B: FRAME_BYTES}) is not None


# -- shared-memory slots -----------------------------------------------------------------------


def test_shared_chunks_go_in_slots_reused_once_released():
    h = Harness(shm=True)
    h.hello(A)
    h.request(A, 1, idxs=range(100), fpc=2, window=2, shm=True)
    (d0, c0, _), (d1, c1, _) = h.chunk(), h.chunk()
    assert d0.slot.new and d1.slot.new and c0.shm.slot != c1.shm.slot
    assert c0.shm.fd == 100 + c0.shm.slot and c0.shm.size == MiB
    h.send(A, Release([c0.shm.slot]), Credit(1, 2))
    d2, c2, _ = h.chunk()
    assert not d2.slot.new and c2.shm.slot == c0.shm.slot
    d3, c3, _ = h.chunk()
    assert d3.slot.new and c3.shm.slot not in (c0.shm.slot, c1.shm.slot)


def test_a_request_carrying_a_release_and_a_cancel_acts_on_them_first():
    h = Harness(shm=True)
    h.hello(A)
    h.request(A, 1, idxs=range(100), fpc=2, window=2, shm=True)
    (_, c0, _), _second = h.chunk(), h.chunk()
    h.send(A, Request(2, Video("v.mp4"), range(10), frames_per_chunk=2, window=2, shm=True, release=[c0.shm.slot], replaces=1))
    assert h.state.requests_of(A) == [2]  # request 1 was cancelled
    d2, c2, _ = h.chunk()
    assert d2.request_id == 2 and not d2.slot.new and c2.shm.slot == c0.shm.slot  # the slot released first is reused
    h.send(A, Request(3, Video("v.mp4"), range(4), replaces=77))  # an unknown request to replace: nothing else changes
    assert h.state.requests_of(A) == [2, 3]


def test_a_client_has_at_most_its_window_plus_three_slots_then_chunks_go_inline():
    h = Harness(shm=True, max_window=2)
    h.hello(A)
    h.request(A, 1, idxs=range(100), fpc=1, window=2, shm=True)
    slots = []
    for _ in range(6):
        h.send(A, Credit(1, 1))
        _, chunk, _ = h.chunk()
        slots.append(chunk.shm.slot if chunk.shm else None)
    assert slots[:5] == [1, 2, 3, 4, 5] and slots[5] is None  # the caller keeps them all: inline
    h.now += ROOM_RETRY_S
    h.send(A, Release([2]), Credit(1, 1))
    assert h.chunk()[1].shm.slot == 2


def test_a_bigger_chunk_retires_the_smallest_free_slot_and_says_so():
    book = SlotBook(max_slots=2)
    a, _ = book.take(10, room=10 * MiB)
    b, _ = book.take(3 * MiB, room=10 * MiB)
    book.release([a.slot, b.slot])
    big, closed = book.take(4 * MiB, room=10 * MiB)
    assert closed == [a.slot] and big.new and big.size == 4 * MiB and book.take_retired() == [a.slot]
    assert book.nbytes == 7 * MiB and book.take_retired() == []


def test_all_clients_slots_stay_within_the_shared_memory_budget():
    h = Harness(shm=True, max_shared_bytes=3 * MiB)
    h.hello(A, B)
    h.request(A, 1, idxs=range(100), fpc=1, window=2, shm=True)
    h.request(B, 1, idxs=range(100), fpc=1, window=2, shm=True)
    got = [h.chunk()[1].shm for _ in range(4)]
    assert [s is not None for s in got] == [True, True, True, False]
    assert sum(h.state.slots_of(c).nbytes for c in (A, B)) == 3 * MiB


def test_a_slot_that_cannot_be_made_sends_the_chunk_inline_and_tries_again_later():
    h = Harness(shm=True)
    h.hello(A)
    h.request(A, 1, idxs=range(100), fpc=1, window=4, shm=True)
    decode = h.state.next_chunk(h.now, {})
    inline = h.state.slot_failed(decode, OSError("ENOMEM"), h.now, {})
    assert inline is not None and inline.slot is None and h.state.slots_of(A).nbytes == 0
    (send,) = h.state.chunk_decoded(inline, h.now)
    assert send.payload and send.message.shm is None
    again = h.state.next_chunk(h.now, {})
    assert again.slot is None  # not before ROOM_RETRY_S
    h.state.chunk_decoded(again, h.now)
    h.now += ROOM_RETRY_S
    assert h.state.next_chunk(h.now, {}).slot.new


def test_a_client_that_did_not_reach_the_probe_gets_no_slots():
    h = Harness(shm=True)
    h.hello(A)
    h.request(A, 1, shm=False)
    assert h.state.slots_of(A) is None and h.chunk()[0].slot is None


# -- caches ------------------------------------------------------------------------------------


def test_only_requests_that_ask_for_frames_again_get_a_cache():
    h = Harness()
    h.hello(A)
    h.request(A, 1, idxs=range(10))
    h.request(A, 2, idxs=[1, 1, 2])
    h.request(A, 3, idxs=[3, 1, 2])
    caches = {d.request_id: d.cache for d, _, _ in (h.chunk(), h.chunk(), h.chunk())}
    assert caches[1] is None
    assert caches[2].finish_gops is False and caches[3].finish_gops is True
    assert caches[3].later == [2] and caches[3].max_bytes == 256 * MiB


def test_idle_requests_give_their_cache_share_to_active_ones():
    h = Harness(request_cache_bytes=100, total_cache_bytes=300)
    h.hello(A, B)
    for client in (A, B):
        for rid in (1, 2):
            h.request(client, rid, idxs=range(50, 0, -1), window=1)
    h.chunks()  # every request used its credit
    h.now += CACHE_IDLE_S
    h.send(A, Credit(1, 1))
    assert h.chunk()[0].cache.max_bytes == 100  # the one active request takes its full share
    resized = {(a.client, a.request_id): a.max_bytes for a in h.state.tick(h.now) if isinstance(a, ResizeCache)}
    assert resized == {(A, 1): 100, (A, 2): 66, (B, 1): 66, (B, 2): 66}  # the idle share what is left


# -- read-around -------------------------------------------------------------------------------


def test_reading_around_a_small_request_waits_for_quiet_and_reads_ahead():
    h = Harness(read_around_frames=10)
    h.hello(A)
    h.request(A, 1, idxs=[40])
    h.chunks()
    assert h.state.read_around(h.now) is None
    assert h.state.wait_s(h.now, {}) == pytest.approx(READ_AROUND_DELAY_S)
    h.now += READ_AROUND_DELAY_S
    # after it only (the decoder is there; reading before it would move the decoder away)
    assert h.state.read_around(h.now) == ReadAround(Video("v.mp4"), False, tuple(range(41, 51)))
    assert h.state.read_around(h.now) is None  # once


def test_after_a_step_back_the_frames_before_come_first_and_after_a_step_forward_only_those_after():
    h = Harness(read_around_frames=10)
    h.hello(A)
    for rid, (i, frames) in enumerate([(40, range(41, 51)), (39, (*range(34, 39), *range(40, 45))), (40, range(41, 51))], 1):
        h.request(A, rid, idxs=[i])
        h.chunks()
        h.now += READ_AROUND_DELAY_S
        assert h.state.read_around(h.now).frames == tuple(frames), i


def test_a_jump_back_is_read_around_like_a_jump_forward():
    """Reading behind a jump would move the decoder away from the frames a person steps to next."""
    h = Harness(read_around_frames=10)
    h.hello(A)
    for rid, (i, frames) in enumerate([(80, range(81, 91)), (40, range(41, 51)), (38, (*range(33, 38), *range(39, 44)))], 1):
        h.request(A, rid, idxs=[i])
        h.chunks()
        h.now += READ_AROUND_DELAY_S
        assert h.state.read_around(h.now).frames == tuple(frames), i


def test_reading_around_stays_inside_the_video_and_a_quarter_of_the_recent_cache():
    h = Harness(read_around_frames=24, recent_cache_bytes=4 * 6 * FRAME_BYTES)
    h.hello(A)
    h.request(A, 1, idxs=[98])
    h.chunks()
    h.now += READ_AROUND_DELAY_S
    assert h.state.read_around(h.now).frames == (99,)  # after 98 (the last frame is 99)
    h.request(A, 2, idxs=[97])
    h.chunks()
    h.now += READ_AROUND_DELAY_S
    assert h.state.read_around(h.now).frames == (94, 95, 96, 98, 99)  # a step back: before it first, then after


def test_large_requests_are_not_read_around():
    h = Harness()
    h.hello(A)
    h.request(A, 1, idxs=range(9), fpc=9)
    assert h.chunk()[0].recent is False
    h.now += 1
    assert h.state.read_around(h.now) is None


# -- pings, dropping clients, idling, shutdown -------------------------------------------------


def test_clients_are_pinged_every_interval_and_one_gone_is_dropped_with_its_requests():
    h = Harness(ping_interval=2.0)
    h.hello(A, B)
    h.request(A, 1)
    assert not [a for a in h.state.tick(1.9) if isinstance(a, Send)]
    pings = [a for a in h.state.tick(2.0) if isinstance(a, Send)]
    assert {(a.client, type(a.message)) for a in pings} == {(A, Ping), (B, Ping)}
    assert h.state.send_failed(pings[1], busy=True) == []  # a ping that does not fit is skipped
    assert h.state.send_failed(pings[0], busy=False) == [ForgetClient(A)]
    assert h.state.clients == [B] and h.state.next_chunk(h.now, {}) is None
    assert not [a for a in h.state.tick(3.9) if isinstance(a, Send)]
    assert [a for a in h.state.tick(4.0) if isinstance(a, Send)]


def test_a_server_with_idle_exit_stops_once_it_has_had_no_client_that_long():
    h = Harness(idle_exit=10.0, ping_interval=2.0)
    assert not [a for a in h.state.tick(9.9) if isinstance(a, Stop)]
    h.hello(A)  # a client keeps it running, however long it says nothing
    assert not [a for a in h.state.tick(30.0) if isinstance(a, Stop)]
    pings = [a for a in h.state.tick(32.0) if isinstance(a, Send)]
    h.state.send_failed(pings[0], busy=False)  # A is gone
    assert not [a for a in h.state.tick(41.9) if isinstance(a, Stop)]
    (stop,) = [a for a in h.state.tick(42.0) if isinstance(a, Stop)]
    assert stop.reason == "no client for 10 s" and h.state.stopping
    assert not [a for a in Harness().state.tick(1e6) if isinstance(a, Stop)]  # 0: never


def test_a_client_that_stops_reading_is_dropped_when_a_chunk_does_not_fit():
    h = Harness()
    h.hello(A)
    h.request(A, 1)
    decode = h.state.next_chunk(h.now, {})
    (send,) = h.state.chunk_decoded(decode, h.now)
    assert h.state.send_failed(send, busy=True) == [ForgetClient(A)]


def test_kept_buffers_are_freed_once_no_chunk_went_for_a_while():
    h = Harness()
    h.hello(A)
    h.request(A, 1)
    h.chunk()
    assert not [a for a in h.state.tick(BUFFERS_IDLE_S - 0.1) if isinstance(a, FreeBuffers)]
    assert FreeBuffers(release_memory=True) in h.state.tick(BUFFERS_IDLE_S)
    assert FreeBuffers(release_memory=False) in h.state.tick(BUFFERS_IDLE_S + 1)


def test_the_loop_sleeps_only_when_nothing_can_go():
    h = Harness(ping_interval=2.0)
    assert h.state.wait_s(0.0, {}) == pytest.approx(0.25)
    assert h.state.wait_s(1.9, {}) == pytest.approx(0.1)  # until the ping
    h.hello(A)
    h.request(A, 1)
    assert h.state.wait_s(0.0, {}) == 0.0
    h.state.receive(A, parts(Ping()))
    assert h.state.wait_s(0.0, {A: 10**9}) == 0.0


def test_shutdown_tells_every_client_that_said_hello():
    h = Harness()
    h.hello(A)
    h.send(B, Ping())  # known, but never said hello
    actions = h.state.shutdown("operator")
    assert [(a.client, a.message) for a in actions if isinstance(a, Send)] == [(A, Shutdown(reason="operator"))]
    assert {a.client for a in actions if isinstance(a, ForgetClient)} == {A, B}


# -- errors ------------------------------------------------------------------------------------


def test_wire_errors_name_our_classes_hide_the_root_and_mark_internal_ones():
    e = wire_error(3, FrameIndexError("/data/root/a.mp4 has 3 frames"), ("/data/root",))
    assert (e.request_id, e.error, e.message) == (3, "FrameIndexError", "a.mp4 has 3 frames")
    e = wire_error(None, KeyError("x"))
    assert e.error == "ServerError" and e.message.startswith("internal server error: KeyError")
    assert "out of memory" in wire_error(1, MemoryError()).message


def test_a_failed_chunk_ends_its_request_with_exactly_one_error():
    h = Harness()
    h.hello(A)
    h.request(A, 1)
    h.request(A, 2)
    actions = h.state.chunk_failed(h.state.next_chunk(h.now, {}), VideoDecodeError("bad frame 3"), h.now)
    assert only_error(actions).error == "VideoDecodeError" and ForgetRequest(A, 1) in actions
    actions = h.state.chunk_failed(h.state.next_chunk(h.now, {}), ZeroDivisionError("boom"), h.now)
    assert ForgetVideo(Video("v.mp4")) in actions and "internal server error" in only_error(actions).message
    assert h.state.requests_of(A) == []


# -- properties --------------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("credit"), st.sampled_from([A, B]), st.integers(0, 3), st.integers(1, 20)),
        st.tuples(st.just("request"), st.sampled_from([A, B]), st.integers(0, 3), st.integers(0, 30)),
        st.tuples(st.just("cancel"), st.sampled_from([A, B]), st.integers(0, 3)),
        st.tuples(st.just("chunk"), st.sampled_from(["ok", "fail", "interrupt"])),
        st.tuples(st.just("gone"), st.sampled_from([A, B])),
        st.tuples(st.just("garbage"), st.sampled_from([A, B]), st.binary(max_size=20)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None, database=None)
@given(OPS)
def test_whatever_clients_send_chunks_stay_within_credit_and_every_request_ends_once(ops):
    h = Harness(max_window=4)
    h.hello(A, B)
    allowed: dict[tuple[bytes, int], int] = {}  # chunks each request may still send
    ended: dict[tuple[bytes, int, int], int] = {}  # per request (ids are reused): last chunks + errors
    started: dict[tuple[bytes, int], int] = {}  # how many requests each id has named
    live: set[tuple[bytes, int]] = set()

    def end(key: tuple[bytes, int]) -> None:
        one = (*key, started[key])
        ended[one] = ended.get(one, 0) + 1
        live.discard(key)

    def look(actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send) and isinstance(a.message, Chunk):
                key = (a.client, a.message.request_id)
                assert key in live and allowed[key] > 0
                allowed[key] -= 1
                if a.message.last_chunk:
                    end(key)
            elif isinstance(a, Send) and isinstance(a.message, Error) and a.message.request_id is not None:
                key = (a.client, a.message.request_id)
                if key in live:
                    end(key)

    for op in ops:
        kind, *args = op
        if kind == "credit":
            client, rid, n = args
            key = (client, rid)
            if key in live:
                allowed[key] = min(allowed[key] + n, 4)
            look(h.send(client, Credit(rid, n)))
        elif kind == "request":
            client, rid, n = args
            key = (client, rid)
            if key in live:
                continue  # a request id in use is refused with an error under that id (covered above)
            before = set(h.state.requests_of(client))
            look(h.request(client, rid, idxs=range(n), fpc=3, window=3))
            if rid in set(h.state.requests_of(client)) - before:
                live.add(key)
                allowed[key] = 3
                started[key] = started.get(key, 0) + 1
        elif kind == "cancel":
            client, rid = args
            look(h.send(client, Cancel(rid)))
            live.discard((client, rid))
        elif kind == "chunk":
            decode = h.state.next_chunk(h.now, {})
            if decode is None:
                continue
            if args[0] == "ok":
                look(h.state.chunk_decoded(decode, h.now))
            elif args[0] == "fail":
                look(h.state.chunk_failed(decode, VideoDecodeError("bad"), h.now))
            else:
                look(h.state.chunk_interrupted(decode, h.now))
        elif kind == "gone":
            h.state.client_gone(args[0], "test")
            live -= {k for k in live if k[0] == args[0]}
            h.hello(args[0])
        else:
            look(h.send(args[0], [args[1]]))
        for client in (A, B):
            assert {k[1] for k in live if k[0] == client} == set(h.state.requests_of(client))
        h.now += 0.01
    assert all(count == 1 for count in ended.values())


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from([A, B, C]), st.integers(1, 40)), max_size=12), st.integers(1, 3 * MiB))
def test_slot_books_never_exceed_their_slots_or_the_budget(takes, budget):
    h = Harness(shm=True, max_window=2, max_shared_bytes=budget)
    h.hello(A, B, C)
    for client in (A, B, C):
        h.request(client, 1, idxs=range(100), fpc=1, window=2, shm=True)
    for client, n in takes:
        for _ in range(n % 3):
            h.send(client, Credit(1, 1))
            h.chunk()
        if n % 2:
            book = h.state.slots_of(client)
            h.send(client, Release(list(book.lent)))
        books = [h.state.slots_of(c) for c in (A, B, C)]
        assert all(len(b.free) + len(b.lent) <= 2 + 3 for b in books)
        assert sum(b.nbytes for b in books) <= max(budget, 0)


def test_explicit_indices_are_checked_at_once_without_a_list():
    h = Harness()
    h.hello(A)
    idxs = np.arange(99, -1, -1, dtype=np.uint32)
    assert h.request(A, 1, idxs=idxs, fpc=50, window=2) == []
    assert [c.frame_idxs[:2] for _, c in h.chunks()] == [[99, 98], [49, 48]]


def test_a_silenced_client_flooding_on_is_to_be_disconnected_once():
    h = Harness()
    h.hello(A)
    for _ in range(CLIENT_QUEUE + 1):
        h.state.receive(A, parts(Ping()))
    h.rounds()  # dropped, told why
    due = []
    for _ in range(DISCARDS_BEFORE_DISCONNECT + 10):
        assert not h.state.receive(A, parts(Ping()))
        due.append(h.state.disconnect_due(A))
    assert due.index(True) == DISCARDS_BEFORE_DISCONNECT - 1 and due.count(True) == 1
    assert not h.state.disconnect_due(B)  # never silenced


def test_the_heap_a_flood_held_is_handed_back_while_it_goes_on_and_once_it_stops():
    """What silenced connections send is read and thrown away; the heap libzmq held for it is
    handed back every TRIM_AFTER_DISCARDS messages (at most once per TRIM_EVERY_S), and once
    more when the flood has been quiet for TRIM_EVERY_S, so RSS does not stay at its peak."""
    h = Harness()
    h.hello(A)

    def released(now: float) -> int:
        return sum(isinstance(a, ReleaseMemory) for a in h.state.tick(now))

    for _ in range(CLIENT_QUEUE + 1):
        h.state.receive(A, parts(Ping()))
    h.rounds()  # dropped and silenced
    assert released(0.0) == 0  # nothing thrown away yet
    for _ in range(TRIM_AFTER_DISCARDS - 1):
        assert not h.state.receive(A, parts(Ping()))
    assert released(0.1) == 0  # fewer than TRIM_AFTER_DISCARDS, and still coming
    assert not h.state.receive(A, parts(Ping()))
    assert released(0.2) == 1
    for _ in range(TRIM_AFTER_DISCARDS):
        h.state.receive(A, parts(Ping()))
    assert released(0.3) == 0  # again due, but not within TRIM_EVERY_S of the last
    assert released(0.2 + TRIM_EVERY_S) == 1
    for _ in range(10):  # a few more, then the flood stops
        h.state.receive(A, parts(Ping()))
    assert released(1.5 + TRIM_EVERY_S) == 0  # seen now: quiet since this tick
    assert released(1.5 + 2 * TRIM_EVERY_S - 0.01) == 0
    assert released(1.5 + 2 * TRIM_EVERY_S) == 1
    assert released(1.5 + 4 * TRIM_EVERY_S) == 0  # nothing thrown away since


# -- frame times ----------------------------------------------------------------------------------


def test_frame_times_open_the_video_and_reply_with_every_frames_time_as_float64_bytes():
    h = Harness()
    h.hello(A)
    (reply,) = h.send(A, FrameTimesRequest(5, Video("v.mp4")))
    message = reply.message
    assert isinstance(message, FrameTimesReply) and (reply.client, message.request_id) == (A, 5)
    assert len(message.pts_seconds) == len(message.duration_seconds) == 8 * 100
    np.testing.assert_array_equal(protocol.times_array(message.pts_seconds), TIMES.pts_seconds)
    np.testing.assert_array_equal(protocol.times_array(message.duration_seconds), np.full(100, 0.04))
    assert message.num_frames_from_header == 102


def test_frame_times_of_a_video_that_fails_to_open_get_its_error():
    h = Harness(VideoNotFoundError("v.mp4 does not exist"))
    h.hello(A)
    error = only_error(h.send(A, FrameTimesRequest(6, Video("v.mp4"))))
    assert (error.error, error.request_id) == ("VideoNotFoundError", 6)


def test_frame_times_missing_from_the_drivers_facts_are_a_server_error():
    h = Harness()
    h.hello(A)
    assert h.state.receive(A, parts(FrameTimesRequest(7, Video("v.mp4"))))
    (opening,) = h.state.handle_round(0.0)
    assert isinstance(opening, OpenVideo) and opening.frame_times and not opening.info
    error = only_error(h.state.video_opened(opening.ticket, FACTS, 0.0))
    assert (error.error, error.request_id) == ("ServerError", 7) and "frame times" in error.message


def test_frame_times_need_hello_and_take_a_whole_share():
    h = Harness()
    assert only_error(h.send(A, FrameTimesRequest(1, Video("v.mp4")))).error == "UnknownClientError"
    h.hello(A)
    h.state.receive(A, parts(FrameTimesRequest(2, Video("v.mp4"))))
    h.state.receive(A, parts(Ping(3)))
    first = h.carry(h.state.handle_round(0.0))
    assert [type(a.message) for a in first] == [FrameTimesReply]  # the ping waits for the next round


def test_describe_names_what_each_request_waits_for_and_who_is_silenced():
    """What ``kill -USR1`` logs beside the stacks: enough to tell why a stream does not move."""
    h = Harness()
    h.hello(A, B)
    h.request(A, 1, idxs=range(20), fpc=2, window=2)
    h.chunks()  # its window of two chunks went: no credit left
    for _ in range(CLIENT_QUEUE + 1):
        h.state.receive(B, parts(Ping()))
    h.state.handle_round(h.now)  # B is dropped and silenced
    h.state.receive(B, parts(Ping()))
    lines = h.state.describe(h.now, {A: 96})
    assert lines[0].startswith("wait ") and "1 requests in the round" in lines[0] and "inline bytes queued 96" in lines[0]
    client_a = next(line for line in lines if line.startswith(f"client {A.hex()}"))
    assert "hello=True" in client_a and "queued_inline=96" in client_a
    request = next(line for line in lines if line.startswith("  request 1 "))
    assert "chunk 2 credit=0 decoding=False" in request and "in_round=True" in request
    assert lines[-1] == f"silenced connections no longer known: 1 (last {B.hex()})"
