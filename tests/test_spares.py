"""Spare slots: the free shared slots of a client that left go to the next client.

Pure tests of the server core (no sockets, no clock): a new slot's memory costs about
1 ms per MB the first time it is written, so a process that opens one AsyncVideo per
video must not pay that for every video. The rule that keeps it exact: only slots the
client released (no array of the caller's is over them) are ever handed on.
"""

from __future__ import annotations

import attrs

from asyncframes._config import MiB
from asyncframes._protocol import Bye, Cancel, Credit, Ping, Release
from asyncframes._server_actions import CloseSpares, ForgetClient, Send
from asyncframes._server_state import BUFFERS_IDLE_S, SPARES_IDLE_S, SlotBook, Spares

from .test_server_state import FACTS, A, B, C, Harness


def _stream(h: Harness, client: bytes, chunks: int, fpc: int = 1, window: int = 4) -> list:
    """``client`` asks for a stream and takes ``chunks`` chunks; returns (decode, chunk)s."""
    h.request(client, 1, idxs=range(100), fpc=fpc, window=window, shm=True)
    got = []
    while len(got) < chunks:
        decode, chunk, _ = h.chunk()
        if decode.client == client:  # others' chunks go out meanwhile
            got.append((decode, chunk))
    return got


def test_a_leaving_client_hands_its_released_slots_to_the_next_and_closes_the_rest():
    h = Harness(shm=True)
    h.hello(A, B)
    got = _stream(h, A, 3)
    held = got[2][1].shm.slot  # the caller still holds the last chunk
    released = [c.shm.slot for _, c in got[:2]]
    (forget,) = h.send(A, Release(released[:1]), Bye(slots=released[1:]))
    assert isinstance(forget, ForgetClient) and forget.client == A
    assert sorted(slot for slot, _ in forget.spares) == sorted(released) and held not in dict(forget.spares)
    fds = {100 + slot for slot in released}
    assert {fd for _, fd in h.state.spares.kept.values()} == fds

    got_b = _stream(h, B, 3)
    adopted = [d.slot for d, _ in got_b[:2]]
    assert all(not s.new and s.spare is not None for s in adopted)  # no new memory for B
    assert {c.shm.fd for _, c in got_b[:2]} == fds  # B maps the same buffers
    assert got_b[2][0].slot.new and not h.state.spares.kept  # then a new one
    assert A not in h.state.clients


def test_a_client_dropped_for_not_answering_leaves_its_released_slots_as_spares_too():
    h = Harness(shm=True)
    h.hello(A)
    (_, c0), (_, c1) = _stream(h, A, 2)
    h.send(A, Release([c0.shm.slot]))
    h.now += 100
    pings = [a for a in h.state.tick(h.now) if isinstance(a, Send) and isinstance(a.message, Ping)]
    (forget,) = h.state.send_failed(pings[0], busy=False)
    assert [slot for slot, _ in forget.spares] == [c0.shm.slot]


def test_the_smallest_spare_that_fits_is_taken():
    spares = Spares()
    big, small, tiny = spares.keep(8 * MiB, 10), spares.keep(2 * MiB, 11), spares.keep(MiB, 12)
    book = SlotBook(max_slots=5)
    use, closed = book.take(MiB + 1, room=0, spares=spares)
    assert use.spare == small and use.size == 2 * MiB and not use.new and closed == []
    assert book.fds[use.slot] == 11 and set(spares.kept) == {big, tiny}
    use, _ = book.take(3 * MiB, room=0, spares=spares)
    assert use.spare == big and book.nbytes == 10 * MiB


def test_spares_are_closed_oldest_first_to_make_room_for_a_new_slot_within_the_budget():
    h = Harness(attrs.evolve(FACTS, frame_shape=(512, 512, 3)), shm=True, max_shared_bytes=4 * MiB)  # 0.75 MiB a frame
    h.hello(A, B)
    got = _stream(h, A, 2)  # two slots of 1 MiB
    (forget,) = h.send(A, Bye(slots=[c.shm.slot for _, c in got]))
    assert len(forget.spares) == 2 and h.state.spares.nbytes == 2 * MiB
    h.request(B, 1, idxs=range(100), fpc=4, window=1, shm=True)  # chunks of 3 MiB: no spare fits
    decode = h.state.next_chunk(h.now, {})
    assert decode.slot.new and decode.slot.size == 3 * MiB
    oldest, newest = (key for _, key in forget.spares)
    assert decode.close_spares == (oldest,) and list(h.state.spares.kept) == [newest]


def test_a_slot_over_the_budget_closes_no_spare_for_nothing():
    h = Harness(attrs.evolve(FACTS, frame_shape=(512, 512, 3)), shm=True, max_shared_bytes=2 * MiB)
    h.hello(A, B)
    got = _stream(h, A, 1)
    h.send(A, Bye(slots=[got[0][1].shm.slot]))
    h.request(B, 1, idxs=range(100), fpc=4, window=1, shm=True)
    decode = h.state.next_chunk(h.now, {})
    assert decode is None or decode.slot is None  # inline, or waiting: never a slot over the budget
    assert h.state.spares.nbytes == MiB


def test_spares_close_when_the_server_has_sent_nothing_for_a_while():
    h = Harness(shm=True)
    h.hello(A)
    got = _stream(h, A, 2)
    h.send(A, Bye(slots=[c.shm.slot for _, c in got]))
    keys = tuple(h.state.spares.kept)
    h.now += BUFFERS_IDLE_S
    assert not [a for a in h.state.tick(h.now) if isinstance(a, CloseSpares)]
    h.now += SPARES_IDLE_S
    assert [a for a in h.state.tick(h.now) if isinstance(a, CloseSpares)] == [CloseSpares(keys)]
    assert not h.state.spares.kept and not [a for a in h.state.tick(h.now) if isinstance(a, CloseSpares)]


def test_a_server_shutting_down_keeps_no_spares():
    h = Harness(shm=True)
    h.hello(A, B)
    (_, c0), = _stream(h, A, 1)
    h.send(A, Release([c0.shm.slot]))
    forgets = [a for a in h.state.shutdown("bye") if isinstance(a, ForgetClient)]
    assert {f.client for f in forgets} == {A, B} and all(f.spares == () for f in forgets)
    assert not h.state.spares.kept


def test_spares_count_against_the_shared_memory_budget():
    h = Harness(shm=True, max_shared_bytes=2 * MiB)
    h.hello(A, B, C)
    got = _stream(h, A, 2)
    h.send(A, Bye(slots=[c.shm.slot for _, c in got]))
    _stream(h, B, 1)  # takes a spare: one spare and B's slot, the whole budget
    h.request(C, 1, idxs=range(100), fpc=1, window=2, shm=True)
    shm = [h.chunk()[1].shm for _ in range(2)]
    assert [s is not None for s in shm] == [True, False]  # a spare for C, then no room: inline
    assert shm[0].fd in {100 + c.shm.slot for _, c in got}


def test_credit_after_bye_is_refused_as_from_an_unknown_client():
    h = Harness(shm=True)
    h.hello(A)
    _stream(h, A, 1)
    h.send(A, Bye())
    (error,) = h.send(A, Credit(1, 1))
    assert error.message.error == "UnknownClientError"


def test_a_client_borrows_the_released_slot_of_a_client_with_nothing_in_flight():
    """A GUI keeps one video open while a second streams: the second takes the first's warm slots."""
    h = Harness(shm=True)
    h.hello(A, B)
    got_a = _stream(h, A, 2)
    h.send(A, Cancel(1), Release([c.shm.slot for _, c in got_a]))  # A stays, with nothing in flight
    (d, c), = _stream(h, B, 1)
    assert not d.slot.new and d.slot.spare is not None
    assert d.to_spares == ((A, got_a[0][1].shm.slot, d.slot.spare),) or d.to_spares == ((A, got_a[1][1].shm.slot, d.slot.spare),)
    assert c.shm.fd in {ca.shm.fd for _, ca in got_a}
    # A is told, with its next chunk, that the slot is no longer its own
    h.send(B, Cancel(1))
    h.request(A, 2, idxs=range(10), fpc=1, window=1, shm=True)
    _, chunk_a, _ = h.chunk()
    assert chunk_a.shm.retired == [d.to_spares[0][1]]


def test_a_client_never_borrows_from_a_client_that_is_streaming():
    h = Harness(shm=True)
    h.hello(A, B)
    got_a = _stream(h, A, 2)
    h.send(A, Release([got_a[0][1].shm.slot]))  # A's request is still in flight
    (d, _), = _stream(h, B, 1)
    assert d.slot.new and d.to_spares == ()
