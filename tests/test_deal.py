"""Dealing a request over servers of different pace, and dealing it again: the rules of
:mod:`asyncframes._deal`, and the client core following them against simulated servers
(a discrete-event simulation with its own clock: no sockets, processes or sleeps)."""

from __future__ import annotations

import heapq
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncframes import _deal
from asyncframes import _protocol as protocol
from asyncframes._client_state import ClientState
from asyncframes._deal import Pace, local_numbers, owners, redeal_weights, shares
from asyncframes._video import Video

pytestmark = pytest.mark.pure


# -- owners, shares ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_servers_of_equal_pace_deal_chunk_k_to_server_k_mod_n(n):
    assert owners(17, [2.5] * n).tolist() == [k % n for k in range(17)]


@given(
    st.integers(0, 400),
    st.lists(st.floats(0.05, 50, allow_nan=False, allow_infinity=False), min_size=1, max_size=5),
)
def test_each_server_gets_a_share_in_proportion_to_its_weight_spread_through_the_request(chunks, weights):
    owner = owners(chunks, weights)
    assert len(owner) == chunks and set(owner.tolist()) <= set(range(len(weights)))
    total = sum(weights)
    for j, w in enumerate(weights):
        mine = np.flatnonzero(owner == j)
        assert abs(len(mine) - chunks * w / total) <= len(weights)  # in proportion
        if len(mine) > 1:  # spread evenly: no gap much longer than its stride
            assert np.diff(mine).max() <= total / w + len(weights) + 1


def test_owners_refuses_weights_that_are_not_positive():
    for bad in ([], [1.0, 0.0], [1.0, -2.0], [float("nan")], [float("inf"), 1.0]):
        with pytest.raises(ValueError, match="positive finite"):
            owners(4, bad)


@given(st.integers(0, 90), st.integers(1, 9), st.lists(st.floats(0.1, 10), min_size=1, max_size=4))
def test_shares_ask_for_every_frame_once_and_each_server_numbers_its_own_chunks(frames, fpc, weights):
    idxs = np.arange(1000, 1000 + frames)
    owner = owners(-(-frames // fpc), weights)
    share = shares(idxs, fpc, owner, len(weights))
    assert sorted(np.concatenate(share).tolist()) == idxs.tolist()
    local = local_numbers(owner)
    for k, j in enumerate(owner):  # server j's chunk local[k], cut from its share, is global chunk k
        assert share[j][local[k] * fpc : (local[k] + 1) * fpc].tolist() == idxs[k * fpc : (k + 1) * fpc].tolist()


# -- pace ----------------------------------------------------------------------------------------------------------------


def test_pace_is_frames_per_second_of_busy_time_and_skips_the_first_chunk_of_a_share():
    pace = Pace()
    pace.dealt(now=10.0, window=2)  # chunks 0 and 1 may start at 10.0
    pace.arrived(8, now=10.5)  # opening + seek: not measured
    assert pace.rate is None
    pace.arrived(8, now=10.6)  # made since the previous arrived: 0.1 s
    assert pace.rate == pytest.approx(80)
    pace.asked(now=11.0)  # credit for chunk 2 sent late: it could not start before 11.0
    pace.arrived(8, now=11.2)  # 0.2 s of work, not the 0.6 s since chunk 1
    assert pace.rate == pytest.approx(16 / 0.3) and pace.since_deal == 2
    pace.forget()
    assert pace.rate is None


def test_the_rest_is_dealt_again_only_when_it_is_out_of_balance_and_measured():
    def pace(rate: float, samples: int = _deal.MIN_SAMPLES) -> Pace:
        p = Pace()
        for _ in range(samples):
            p.samples.append((8, 8 / rate))
        p.since_deal = samples
        return p

    fast, slow = pace(100), pace(20)
    assert redeal_weights({0: 400, 1: 400}, {0: fast, 1: slow}, 100) == [pytest.approx(100), pytest.approx(20)]
    assert redeal_weights({0: 400, 1: 80}, {0: fast, 1: slow}, 60) is None  # already in proportion
    assert redeal_weights({0: 400, 1: 400}, {0: fast, 1: pace(20, samples=_deal.MIN_SAMPLES - 1)}, 100) is None  # not measured enough
    assert redeal_weights({0: 16, 1: 16}, {0: fast, 1: slow}, _deal.MIN_CHUNKS_LEFT_PER_SERVER * 2 - 1) is None  # too few left
    assert redeal_weights({0: 400}, {0: fast}, 100) is None  # one server


# -- the client core against simulated servers ------------------------------------------------------------------------


class SimServer:
    """A frame server that makes one chunk at a time against credit, taking ``seconds_per_frame``."""

    def __init__(self, j: int, seconds_per_frame: float) -> None:
        self.j, self.spf = j, seconds_per_frame
        self.request = None  # (request_id, share, window credit)
        self.made = 0
        self.credit = 0
        self.busy = False

    def take(self, message, now, events) -> None:
        if isinstance(message, protocol.Request):
            self.request, self.made, self.credit = message, 0, message.window
        elif isinstance(message, protocol.Cancel) and self.request and message.request_id == self.request.request_id:
            self.request = None
        elif isinstance(message, protocol.Credit) and self.request and message.request_id == self.request.request_id:
            self.credit += message.chunks
        self.work(now, events)

    def work(self, now, events) -> None:
        r = self.request
        if self.busy or r is None or self.credit == 0:
            return
        share = protocol.selection_indices(r.frame_idxs, 0)
        pieces = [share[i : i + r.frames_per_chunk] for i in range(0, len(share), r.frames_per_chunk)]
        if self.made >= len(pieces):
            return
        piece = [int(i) for i in pieces[self.made]]
        chunk = protocol.Chunk(r.request_id, self.made, self.made == len(pieces) - 1, piece, "|u1", [len(piece), 1, 1, 1])
        self.made += 1
        self.credit -= 1
        self.busy = True
        heapq.heappush(events, (now + len(piece) * self.spf, self.j, id(chunk), chunk))


def simulate(seconds_per_frame: list[float], frames: int, fpc: int, window: int = 2):
    """Run one request of ``frames`` frames over simulated servers; (frames got in order, end time, state, chunks by server)."""
    n = len(seconds_per_frame)
    state = ClientState([f"tcp://sim{j}:1" for j in range(n)], window=window, shared_memory=False)
    for j in range(n):
        state.received(j, protocol.Welcome(protocol.PROTOCOL_VERSION, "sim", None, None))
    servers = [SimServer(j, spf) for j, spf in enumerate(seconds_per_frame)]
    events: list = []
    got: list[int] = []
    by_server: Counter = Counter()

    def carry_out(actions, now):
        assert actions.error is None, actions.error
        for send in actions.send:
            servers[send.server].take(send.message, now, events)

    rid = state.new_request_id()
    carry_out(state.start_request(rid, Video("v.mp4"), np.arange(frames), fpc, now=0.0), 0.0)
    now = 0.0
    while not state.stream.done:
        now, j, _, chunk = heapq.heappop(events)
        servers[j].busy = False
        carry_out(state.received(j, chunk, memoryview(bytes(len(chunk.frame_idxs))), now=now), now)
        while (arrival := state.next_ready()) is not None:
            carry_out(state.check(arrival), now)
            got += arrival.message.frame_idxs
            by_server[arrival.server] += 1
            carry_out(state.took(arrival, now=now), now)
        servers[j].work(now, events)
    return got, now, state, by_server


def test_servers_of_equal_pace_keep_chunk_k_from_server_k_mod_n_without_dealing_again():
    got, _end, state, by_server = simulate([0.001, 0.001, 0.001], frames=960, fpc=8)
    assert got == list(range(960))
    assert state.last.redeals == 0 and by_server == {0: 40, 1: 40, 2: 40}


def test_a_slow_server_does_not_pace_the_request_its_share_shrinks_to_its_pace():
    spf = [0.001, 0.001, 0.005]  # the third server is five times slower
    frames = 2400
    got, end, state, by_server = simulate(spf, frames=frames, fpc=8)
    assert got == list(range(frames))  # every frame once, in order, across the new deals
    assert state.last.redeals >= 1
    by_pace = frames / sum(1 / s for s in spf)  # every server busy to the end: 1.09 s
    as_dealt = frames / len(spf) * max(spf)  # chunk k from server k mod 3: 4 s
    assert end < 1.25 * by_pace < as_dealt
    assert by_server[2] < by_server[0] / 3 and by_server[2] < by_server[1] / 3


def test_the_next_request_is_dealt_by_the_paces_already_measured():
    spf = [0.001, 0.004]
    state_frames = 1600
    _got, _end, state, _ = simulate(spf, frames=state_frames, fpc=8)
    rid = state.new_request_id()
    actions = state.start_request(rid, Video("v.mp4"), np.arange(800), 8, now=100.0)
    asked = {s.server: len(protocol.selection_indices(s.message.frame_idxs, 0)) for s in actions.send if isinstance(s.message, protocol.Request)}
    assert asked[0] > 3 * asked[1] > 0  # about 4 to 1
