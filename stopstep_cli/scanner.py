"""Turning raw output into step observations, fast.

The output pump hands every read to :meth:`LineScanner.feed` before it passes
the bytes on. The scanner works on the read in place (no copy, no split into
lines): it looks for the formats' literal anchors from the end of the read
backwards, and runs a regex only on the line around an anchor. The latest step
of a read wins; earlier step lines of the same read are counted as coalesced.

Lines end at ``\\n`` or ``\\r``. Progress-bar formats (``StepFormat.live``)
also read the line still being drawn, so a bar is seen when it is drawn, not
when the next one replaces it: a count ending exactly where the bytes end is
left for later, since it may still be growing ("step 1" of "step 12"), and a
field cut there is left out. Other formats wait for the line's end: ``print``
without a buffer writes the text and its newline separately, and a line read
between the two would lose its trailing fields (a NaN loss).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

from .observation import OUTPUT, Observation
from .patterns import StepFormat, clean_line

#: Bytes of one line that are read for a step; the rest passes through unread.
MAX_LINE = 64 * 1024


class LineScanner:
    """Finds the latest step in the reads of one stream."""

    def __init__(self, formats: Sequence[StepFormat], source: str, max_line: int = MAX_LINE, kind: str = OUTPUT):
        self.formats = tuple(formats)
        self.source = source
        self.kind = kind
        self.max_line = max_line
        anchors = []
        for fmt in self.formats:
            anchors.extend(fmt.anchors)
        # One format without anchors makes every line a candidate.
        self.anchors: Optional[Tuple[bytes, ...]] = (
            tuple(dict.fromkeys(anchors)) if all(f.anchors for f in self.formats) else None
        )
        self.contexts = tuple((f, f.context) for f in self.formats if f.context)
        # Formats read from a line still being drawn (progress bars); the others
        # wait for the line's end, so its fields (a NaN loss) are never cut off.
        self.live_formats = tuple(f for f in self.formats if f.live)
        self.states: Dict[str, dict] = {f.name: {} for f in self.formats}
        self.carry = bytearray()  # the unfinished line so far (first max_line bytes)
        self._hot = self.anchors[0] if self.anchors else b"\n"  # the anchor that found the last step
        self.carry_step: Optional[int] = None  # step already taken from it

    # -- public -----------------------------------------------------------

    def feed(self, buf, n: int) -> List[Observation]:
        """Scan ``buf[:n]``; the latest new observation in it, as a list of 0 or 1."""
        out: List[Observation] = []
        start = 0
        if self.carry:
            end = _find_terminator(buf, 0, n)
            if end < 0:
                if self._grow_carry(buf, 0, n):
                    obs = self._match_partial(bytes(self.carry))
                    if obs is not None:
                        out.append(obs)
                return out
            self._grow_carry(buf, 0, end)
            line, seen = bytes(self.carry), self.carry_step
            self.carry.clear()
            self.carry_step = None
            self._apply_context(line)
            obs = self._match(line)
            if obs is not None and obs.step != seen:
                out.append(obs)
            start = end + 1
        if self.contexts:
            for line_start, line_end in self._context_lines(buf, start, n):
                self._scan_region(buf, start, line_start, out)
                self._apply_context(bytes(buf[line_start:line_end]))
                start = line_end + 1
        self._scan_region(buf, start, n, out, open_end=True)
        if len(out) > 1:  # the latest wins (context lines already applied in order)
            last = out[-1]
            last.coalesced += sum(obs.coalesced + 1 for obs in out[:-1])
            out = [last]
        return out

    # -- regions ----------------------------------------------------------

    def _scan_region(self, buf, a: int, b: int, out: List[Observation], open_end: bool = False) -> None:
        """Find the latest step in ``buf[a:b]``; with open_end the last line may be unfinished."""
        if a >= b:
            return
        done_end = b  # lines in [a, done_end) are complete
        if open_end:
            last = _rfind_terminator(buf, a, b)
            if last < b - 1:  # an unfinished tail
                self._grow_carry(buf, last + 1, b)
                tail = self._match_partial(bytes(self.carry))
                if tail is not None:
                    tail.coalesced = self._count_candidates(buf, a, last + 1)
                    out.append(tail)
                    return
            done_end = last + 1
        obs, line_start = self._latest_complete(buf, a, done_end)
        if obs is not None:
            obs.coalesced = self._count_candidates(buf, a, line_start)
            out.append(obs)

    def _latest_complete(self, buf, a: int, b: int) -> Tuple[Optional[Observation], int]:
        """The last matching complete line in ``buf[a:b]`` and where it starts."""
        pos = b
        anchors = self.anchors
        while pos > a:
            if anchors is None:
                hit = pos - 1
                # skip the terminator that ends the previous line
                while hit >= a and buf[hit] in (10, 13):
                    hit -= 1
                if hit < a:
                    break
            else:
                # The last hit of any anchor; each next anchor need only look past
                # the best so far, and the one that hit last time goes first.
                hit, hot = -1, None
                for anchor in anchors:
                    found = buf.rfind(anchor, max(a, hit + 1), pos)
                    if found > hit:
                        hit, hot = found, anchor
                if hit < 0:
                    break
                if hot is not anchors[0]:
                    anchors = self.anchors = (hot,) + tuple(x for x in anchors if x is not hot)
                self._hot = hot
            line_start = _rfind_terminator(buf, a, hit) + 1
            line_end = _find_terminator(buf, hit, b)
            if line_end < 0:
                line_end = b
            line_end = min(line_end, line_start + self.max_line)
            obs = self._match(bytes(buf[line_start:line_end]), anchored=anchors is not None)
            if obs is not None:
                return obs, line_start
            pos = line_start
        return None, a

    def _count_candidates(self, buf, a: int, b: int) -> int:
        """Step lines passed over in ``buf[a:b]``: those holding the anchor of the line that
        won (one pass; a line of another kind is not counted)."""
        if a >= b:
            return 0
        if self.anchors is None:
            return buf.count(b"\n", a, b) + buf.count(b"\r", a, b)
        return buf.count(self._hot, a, b)

    # -- lines ------------------------------------------------------------

    def _match(self, raw: bytes, partial: bool = False, anchored: bool = False) -> Optional[Observation]:
        """The step in one line, if any; ``anchored``: the caller found an anchor in it already."""
        if not anchored and self.anchors is not None and not any(anchor in raw for anchor in self.anchors):
            return None
        text = clean_line(raw)
        for fmt in self.live_formats if partial else self.formats:
            match = fmt.regex.search(text)
            if match is None:
                continue
            fields = fmt.fields(match)
            if partial:
                if _ends_at(match, _COUNTING_GROUPS, len(text)):
                    return None  # the count may still be growing: "step 1" of "step 12"
                # a field cut where the bytes end ("loss: 0.5" of "0.53") is left out
                fields = {name: value for name, value in fields.items() if match.end(name) < len(text)}
            step = fmt.to_step(match, self.states[fmt.name])
            if step is not None:
                return Observation(step, fields, self.source, kind=self.kind, line=text.strip(), time=time.monotonic())
        return None

    def _match_partial(self, raw: bytes) -> Optional[Observation]:
        if not self.live_formats:
            return None
        obs = self._match(raw, partial=True)
        if obs is None or obs.step == self.carry_step:
            return None
        self.carry_step = obs.step
        return obs

    def _grow_carry(self, buf, a: int, b: int) -> bool:
        """Append ``buf[a:b]`` to the unfinished line, up to max_line; False if full."""
        room = self.max_line - len(self.carry)
        if room <= 0 or a >= b:
            return False
        self.carry += buf[a : min(b, a + room)]
        return True

    # -- context lines (Keras' "Epoch 3/10") -------------------------------

    def _context_lines(self, buf, a: int, b: int) -> List[Tuple[int, int]]:
        """Complete context lines in ``buf[a:b]``, in order."""
        found = set()
        for _fmt, rule in self.contexts:
            for anchor in rule.anchors:
                pos = buf.find(anchor, a, b)
                while pos >= 0:
                    end = _find_terminator(buf, pos, b)
                    if end < 0:
                        break
                    found.add((_rfind_terminator(buf, a, pos) + 1, end))
                    pos = buf.find(anchor, end, b)
        return sorted(found)

    def _apply_context(self, raw: bytes) -> None:
        if not self.contexts:
            return
        text = None
        for fmt, rule in self.contexts:
            if not any(anchor in raw for anchor in rule.anchors):
                continue
            text = text if text is not None else clean_line(raw)
            match = rule.regex.search(text)
            if match:
                rule.apply(match, self.states[fmt.name])


_COUNTING_GROUPS = ("step", "step2", "total")


def _ends_at(match, names, end: int) -> bool:
    """Does one of the counting groups (or the only group) end exactly at ``end``?"""
    groups = match.re.groupindex
    present = [name for name in names if name in groups] or ([1] if match.re.groups else [])
    return any(match.end(name) == end for name in present if match.start(name) >= 0)


def _find_terminator(buf, a: int, b: int) -> int:
    """Index of the first line terminator in ``buf[a:b]``, or -1."""
    nl = buf.find(b"\n", a, b)
    cr = buf.find(b"\r", a, nl if nl >= 0 else b)
    return cr if cr >= 0 else nl


def _rfind_terminator(buf, a: int, b: int) -> int:
    """Index of the last line terminator in ``buf[a:b]``, or ``a - 1``."""
    nl = buf.rfind(b"\n", a, b)
    cr = buf.rfind(b"\r", max(a, nl + 1), b)
    return cr if cr >= 0 else nl if nl >= 0 else a - 1
