"""The frame index: which presentation timestamp is frame *i*, and where to seek for it.

Frame *i* is the i-th frame a plain sequential decode presents. We find the
frames by demuxing packets only (no decoding): every packet the decoder will
present carries one presentation timestamp, so the sorted timestamps of the
non-discarded packets are the frames in presentation order. Keyframe packets
(discarded ones included: an edit list may start a GOP before the first shown
frame) are the places a decoder can start from.

Demuxers do not agree on what a seek timestamp means: Matroska and AVI look it
up among keyframe presentation times, MP4 subtracts a fixed offset and looks
it up among keyframe decode times (so with B-frames and a variable frame rate
a keyframe's pts can lead to the GOP before it), and MPEG-TS/PS binary-search
the decode times of *all* packets (a keyframe's pts leads to a packet after
it). The index therefore keeps each keyframe's decode timestamp too, and the
reader checks where a seek landed by the packets it demuxes (:func:`landing`)
before it decodes anything.

The container's own frame count is never used: it is 0 or wrong for webm, mkv
and ts. When timestamps are missing or ambiguous the index says so
(``sequential``) and the reader falls back to counting decoded frames.
"""

from __future__ import annotations

import bisect
import json
from fractions import Fraction
from typing import Any, Optional, Sequence, Union

import attrs
import numpy as np

from .errors import FrameIndexError


@attrs.frozen
class FrameIndex:
    """Presentation timestamps of every frame, and the keyframe timestamps to seek to."""

    #: pts of frame i, in presentation order (strictly increasing unless ``sequential``,
    #: where entries are whatever the decoder said, None included).
    pts: Sequence[Optional[int]]
    #: sorted pts of packets a decoder can start at (keyframes).
    seek_pts: Sequence[int]
    #: True when timestamps cannot identify frames; the reader must count from the start.
    sequential: bool = False
    #: why the index is sequential, for logs.
    reason: str = ""
    #: dts of the keyframe packet at each ``seek_pts`` (None: unknown); empty when not known at all.
    seek_dts: Sequence[Optional[int]] = ()
    #: pts - dts of the stream's first packet (its reorder delay at the start; 0 if unknown).
    #: MP4 turns a seek timestamp into a decode time by subtracting about this much.
    seek_lead: int = 0

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    def index_of(self, pts: Optional[int]) -> Optional[int]:
        """Frame index presenting ``pts``, or None if no frame has it."""
        if pts is None:
            return None
        i = bisect.bisect_left(_timestamps(self), pts)
        if i < len(self.pts) and self.pts[i] == pts:
            return i
        return None

    def first_at_or_after(self, pts: int) -> int:
        """Index of the first frame presented at or after ``pts``."""
        return bisect.bisect_left(_timestamps(self), pts)

    def keyframe_for(self, i: int, back: int = 0) -> int:
        """pts of the keyframe to seek to for frame ``i``; ``back`` steps to earlier keyframes."""
        k = bisect.bisect_right(self.seek_pts, _timestamps(self)[i]) - 1 - back
        return self.seek_pts[max(k, 0)]

    def seek_timestamp(self, key: int, by_dts: bool = False) -> int:
        """The timestamp to hand the demuxer's seek to land on the keyframe presented at ``key``.

        ``by_dts``: the keyframe's decode timestamp, for demuxers that binary-search the
        decode times of every packet (MPEG-TS, MPEG-PS); the reader learns that a file needs
        it from a seek that went past its keyframe. Otherwise a timestamp in the keyframe's
        GOP that every keyframe-index demuxer maps to this keyframe: at least its pts (Matroska,
        AVI look up keyframe pts) and at least its dts plus the stream's starting reorder delay
        (MP4 subtracts that delay and looks up keyframe dts: with a variable frame rate a
        keyframe's own pts can map before its dts, a GOP early), but before the next keyframe.
        """
        k = bisect.bisect_left(self.seek_pts, key)
        if k >= len(self.seek_pts) or self.seek_pts[k] != key or k >= len(self.seek_dts):
            return key
        dts = self.seek_dts[k]
        if dts is None:
            return key
        if by_dts:
            return dts
        at = max(key, dts + self.seek_lead)
        if k + 1 < len(self.seek_pts):
            at = min(at, self.seek_pts[k + 1] - 1)
        return at

    def dts_of_key(self, key: int) -> Optional[int]:
        """The decode timestamp of the keyframe presented at ``key`` (None: unknown)."""
        k = bisect.bisect_left(self.seek_pts, key)
        if k < len(self.seek_dts) and self.seek_pts[k] == key:
            return self.seek_dts[k]
        return None


def landing(pts: Optional[int], key: int) -> str:
    """Where a packet met right after a seek lies relative to the keyframe presented at ``key``.

    ``"before"``: an earlier packet (all packets decoded before a keyframe are shown before
    it), which can be dropped without decoding; ``"at"``: the keyframe itself; ``"after"``:
    the seek went past the keyframe; ``"unknown"``: no timestamp, decode from here.
    """
    if pts is None:
        return "unknown"
    if pts < key:
        return "before"
    return "at" if pts == key else "after"


def index_from_packets(packets: Sequence[tuple[Any, ...]]) -> FrameIndex:
    """Build the index from ``(pts, is_keyframe, is_discard[, dts])`` of each video packet in file order."""
    shown = [p[0] for p in packets if not p[2]]
    known = [pts for pts in shown if pts is not None]
    if len(known) != len(shown):
        return FrameIndex(pts=[], seek_pts=[], sequential=True, reason="packets without timestamps")
    order = sorted(known)
    if any(a == b for a, b in zip(order, order[1:])):
        return FrameIndex(pts=[], seek_pts=[], sequential=True, reason="duplicate timestamps")
    key_dts: dict[int, Optional[int]] = {}
    for p in packets:
        if p[1] and p[0] is not None:
            key_dts.setdefault(p[0], p[3] if len(p) > 3 else None)
    seek = sorted(key_dts)
    if not seek or (order and seek[0] > order[0]):
        # No keyframe before the first shown frame: the decoder's behaviour at the
        # start cannot be predicted from packets alone, so count decoded frames.
        return FrameIndex(pts=[], seek_pts=[], sequential=True, reason="stream does not start at a keyframe")
    first = next((p for p in packets if len(p) > 3 and p[0] is not None and p[3] is not None), None)
    lead = max(first[0] - first[3], 0) if first is not None else 0
    return FrameIndex(pts=order, seek_pts=seek, seek_dts=[key_dts[k] for k in seek], seek_lead=lead)


def _timestamps(index: FrameIndex) -> Sequence[int]:
    """The pts list of a seekable index (all known)."""
    return index.pts  # type: ignore[return-value]


def check_frame_idxs(idxs: "Union[Sequence[int], range, np.ndarray]", frame_count: int, filename: str) -> None:
    """Raise :class:`FrameIndexError` naming the first of ``idxs`` that is not a frame of ``filename``.

    Vectorised: a range is checked at its ends, anything else as one array, so a request
    for millions of frames is checked in milliseconds.
    """
    first = first_outside(idxs, frame_count)
    if first is None:
        return
    n = frame_count
    if first < 0:
        raise FrameIndexError(f"frame index {first} is negative; {filename} has frames 0..{n - 1}")
    raise FrameIndexError(f"frame index {first} is out of range; {filename} has {n} frames (0..{n - 1})")


def first_outside(idxs: "Union[Sequence[int], range, np.ndarray]", n: int) -> Optional[int]:
    """The first of ``idxs`` outside ``0..n-1`` (None: all are frames)."""
    if not len(idxs):
        return None
    if isinstance(idxs, range):  # monotonic: the frames inside are a prefix of it
        if not 0 <= idxs[0] < n:
            return idxs[0]
        inside = len(range(idxs.start, n if idxs.step > 0 else -1, idxs.step))
        return idxs[inside] if inside < len(idxs) else None
    arr = np.asarray(idxs)
    outside = np.flatnonzero((arr < 0) | (arr >= n))
    return int(arr[outside[0]]) if outside.size else None


def per_video(frame_idxs: Any, videos: int) -> list[Any]:
    """A frame selection given for several videos, as one entry per video.

    ``frame_idxs`` may be None (every frame of every video), one sequence of indices for
    every video (ints, a range or an array), or one sequence (or None) per video.

    Raises:
        ValueError: a list of selections whose length is not the number of videos.
    """
    if frame_idxs is None:
        return [None] * videos
    if isinstance(frame_idxs, (range, np.ndarray)) or (
        isinstance(frame_idxs, Sequence) and not isinstance(frame_idxs, str)
        and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in frame_idxs)
    ):
        return [frame_idxs] * videos
    per = list(frame_idxs)
    if len(per) != videos:
        raise ValueError(f"frame_idxs gives {len(per)} selections for {videos} videos: give one per video, or one for all")
    return per


#: The format of a stored index (:func:`index_record`); bumped when it changes.
RECORD_VERSION = 1


@attrs.frozen
class StreamFacts:
    """What opening a file tells about its video stream (PyAV's container and stream headers),
    kept in a record so a reader of an indexed file answers without opening it."""

    width: int
    height: int
    codec: str
    pix_fmt: str
    #: The container's format name ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", ...).
    container_format: str
    fps: float
    #: The stream's duration in seconds (None: not stated).
    duration: Optional[float]
    time_base: Optional[Fraction]
    #: The average (or guessed) frame rate (None: neither known).
    average_rate: Optional[Fraction]
    #: The frame count the container's header states (None: none stated).
    frames_from_header: Optional[int]


def _fraction(value: Optional[Fraction]) -> Optional[list[int]]:
    return None if value is None else [value.numerator, value.denominator]


def facts_entry(facts: StreamFacts) -> np.ndarray:
    """``facts`` as one record entry (JSON in a 0-d string array: floats and fractions exact)."""
    return np.array(json.dumps({
        "width": facts.width, "height": facts.height, "codec": facts.codec, "pix_fmt": facts.pix_fmt,
        "container": facts.container_format, "fps": facts.fps, "duration": facts.duration,
        "time_base": _fraction(facts.time_base), "average_rate": _fraction(facts.average_rate),
        "frames": facts.frames_from_header,
    }), dtype=str)


def record_facts(record: Any) -> Optional[StreamFacts]:
    """The stream facts a record keeps (None: it keeps none, as records written before they were kept).

    Raises:
        ValueError: the entry is there but does not hold facts as :func:`facts_entry` writes them.
    """
    if "facts" not in record:
        return None
    entry = record["facts"]
    if entry.ndim != 0 or entry.dtype.kind != "U":
        raise ValueError("record's facts are not one string")
    try:
        d = json.loads(str(entry))
    except ValueError as exc:
        raise ValueError(f"record's facts are not JSON ({exc})") from None
    keys = {"width", "height", "codec", "pix_fmt", "container", "fps", "duration", "time_base", "average_rate", "frames"}
    if not isinstance(d, dict) or set(d) != keys:
        raise ValueError("record's facts do not name what a stream's facts are")

    def whole(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    def fraction(value: Any) -> Optional[Fraction]:
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == 2 and whole(value[0], -(2**63)) and whole(value[1], 1)):
            raise ValueError(f"record's facts hold {value!r} for a fraction")
        return Fraction(value[0], value[1])

    if not (whole(d["width"], 1) and whole(d["height"], 1) and (d["frames"] is None or whole(d["frames"], 1))):
        raise ValueError("record's facts hold a size or frame count that is not a positive integer")
    if not all(isinstance(d[k], str) for k in ("codec", "pix_fmt", "container")):
        raise ValueError("record's facts hold a codec, pixel format or container that is not a string")
    if not isinstance(d["fps"], float) or not (d["duration"] is None or isinstance(d["duration"], float)):
        raise ValueError("record's facts hold a frame rate or duration that is not a number")
    return StreamFacts(
        width=d["width"], height=d["height"], codec=d["codec"], pix_fmt=d["pix_fmt"], container_format=d["container"],
        fps=d["fps"], duration=d["duration"], time_base=fraction(d["time_base"]),
        average_rate=fraction(d["average_rate"]), frames_from_header=d["frames"],
    )


#: How a record stores whether the first frame is gray (see :func:`record_grayscale`).
_GRAY_UNKNOWN, _GRAY_NO, _GRAY_YES = -1, 0, 1


def index_record(
    index: FrameIndex, grayscale: Optional[bool] = None, facts: Optional[StreamFacts] = None
) -> dict[str, np.ndarray]:
    """``index`` as named arrays, for storing (:func:`asyncframes._index_store.write_arrays`; nothing needs pickle).

    Missing timestamps (``None``, possible only in a sequential index) are kept as a mask.
    ``grayscale``: whether the first frame showed gray content (None: not known yet), so a
    new reader of the file need not decode it again to tell. ``facts``: the stream's
    metadata, so a new reader need not open the file to describe it (None: not kept).
    """
    pts = np.array([0 if p is None else p for p in index.pts], dtype=np.int64)
    dts = np.array([0 if d is None else d for d in index.seek_dts], dtype=np.int64)
    return {
        "version": np.array(RECORD_VERSION, dtype=np.int64),
        "pts": pts,
        "pts_missing": np.array([p is None for p in index.pts], dtype=bool),
        "seek_pts": np.asarray(index.seek_pts, dtype=np.int64),
        "seek_dts": dts,
        "seek_dts_missing": np.array([d is None for d in index.seek_dts], dtype=bool),
        "sequential": np.array(index.sequential),
        "reason": np.array(index.reason, dtype=str),
        "seek_lead": np.array(index.seek_lead, dtype=np.int64),
        "grayscale": np.array(_GRAY_UNKNOWN if grayscale is None else _GRAY_YES if grayscale else _GRAY_NO, dtype=np.int8),
        **({} if facts is None else {"facts": facts_entry(facts)}),
    }


def record_grayscale(record: Any) -> Optional[bool]:
    """Whether a stored record says the first frame is gray (None: it does not know; records
    written before this was kept have no such entry, and say nothing).

    Raises:
        ValueError: the entry is there but is not one of the values :func:`index_record` writes.
    """
    if "grayscale" not in record:
        return None
    value = record["grayscale"]
    if value.ndim != 0 or value.dtype.kind != "i" or int(value) not in (_GRAY_UNKNOWN, _GRAY_NO, _GRAY_YES):
        raise ValueError(f"record's grayscale is {value!r}, expected one of -1, 0, 1")
    return None if int(value) == _GRAY_UNKNOWN else int(value) == _GRAY_YES


def index_from_record(record: Any) -> FrameIndex:
    """The index a stored record holds (``record``: a mapping of the arrays of :func:`index_record`).

    Raises:
        ValueError: the record is of another version, incomplete, or does not make a valid
            index (lengths that differ, timestamps out of order): never trust it then.
    """
    try:
        if int(record["version"]) != RECORD_VERSION:
            raise ValueError(f"record version {int(record['version'])}, expected {RECORD_VERSION}")
        pts, missing = record["pts"], record["pts_missing"]
        seek_pts, seek_dts, dts_missing = record["seek_pts"], record["seek_dts"], record["seek_dts_missing"]
        sequential, reason, lead = bool(record["sequential"]), str(record["reason"]), int(record["seek_lead"])
    except KeyError as exc:
        raise ValueError(f"record lacks {exc}") from None
    for name, array, kind in (("pts", pts, "i"), ("seek_pts", seek_pts, "i"), ("seek_dts", seek_dts, "i"),
                              ("pts_missing", missing, "b"), ("seek_dts_missing", dts_missing, "b")):
        if array.ndim != 1 or array.dtype.kind != kind:
            raise ValueError(f"record's {name} is not a 1-D array of kind {kind!r}")
    if len(missing) != len(pts) or len(dts_missing) != len(seek_dts) or len(seek_dts) not in (0, len(seek_pts)):
        raise ValueError("record's arrays differ in length")
    if not len(pts) or not _increasing(seek_pts):
        raise ValueError("record has no frames, or keyframes out of order")
    if not sequential and (missing.any() or not _increasing(pts) or not len(seek_pts) or seek_pts[0] > pts[0]):
        raise ValueError("record's timestamps do not make a packet index")
    return FrameIndex(
        pts=[None if m else int(p) for p, m in zip(pts, missing)] if sequential else pts.tolist(),
        seek_pts=seek_pts.tolist(),
        sequential=sequential,
        reason=reason,
        seek_dts=[None if m else int(d) for d, m in zip(seek_dts, dts_missing)],
        seek_lead=lead,
    )


def _increasing(values: np.ndarray) -> bool:
    """Strictly increasing (neighbours compared: a difference could overflow int64)."""
    return bool(np.all(values[1:] > values[:-1]))
