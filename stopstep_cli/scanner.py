"""Turning raw output into step observations, fast and in bounded time.

The output pump hands every read to :meth:`LineScanner.feed` before it passes
the bytes on, and calls :meth:`LineScanner.end_of_stream` once when the stream
ends. The scanner works on the read in place (no copy, no split into lines): it
looks for the formats' literal anchors from the end of the read backwards, and
runs a regex only on the lines around them.

Every step counts. ``feed`` returns the observations of a read in the order
their lines came, not only the latest: under torchrun the ranks' lines
interleave (``[rank0]: step 100`` then ``[rank1]: step 99``), and the caller
keeps the highest. To keep a read's cost bounded when output floods in (a
1 MiB read can hold 50,000 step lines), candidate lines (holding an anchor of
some format; every non-empty line if a format has none) are examined from the
end of the read back until K = :data:`MAX_LINES_PER_READ` = 64 of them matched
a format, or :data:`MAX_MISSES_PER_READ` = 4,096 of them matched none (an anchor
such as ``ter`` is in "parameters" and "after": a step line followed by a
hundred such lines in one write is still read); each costs one regex search.
The candidate lines before them are not read: their number is estimated from
how densely step lines came in the part that was read, and added to the first
observation's ``coalesced`` (counting them with ``bytes.count`` cost 1 ms a MiB
here, most of what a flooded read cost). When those 64 rise step by step (one
process flooding), the lines before them hold lower steps. When they do not
(ranks interleave; a summary of earlier steps follows the last one), the highest
step may be further back, and the read is read again with a budget of
:data:`MAX_LINES_INTERLEAVED` = 4,096 step lines: a rank would have to fall more
than 4,096 step lines behind the leader within one read for the lead to be
missed (that second look costs about 12 us a line, so up to 50 ms for a 1 MiB
read of repeated steps, only when output floods that way). Context lines (Keras' ``Epoch 3/10``) before the examined lines still
count: the last one is applied first.

Why 64, measured on the 2-core Xeon this was written on (medians, machine
shared with other work). Per 1 MiB read: 37,000 lines ``step N loss 0.x lr
0.0001``: 1.05 ms before (one line read, all counted), 0.93 ms now (about 12 us
per line examined); tqdm ``\\r`` bars 1.09 -> 0.85 ms; 8 ranks interleaved
0.94 -> 1.10 ms; lines without a step 0.78 -> 0.81 ms. End to end, 256 MiB of
step lines through ``stopstep run -- cat`` with the supervisor of the time
(hooks run for each observation that raises the step), relative to ``cat |
cat`` in the same run: 1.33x before, 1.28x with K = 64, 1.02x with K = 32,
1.04x with K = 16 (CPU 0.72 s before, 0.69 s with K = 64). K = 64 costs what a
read cost before and covers the most interleaved lines for that price.

Lines end at ``\\n`` or ``\\r``. Progress-bar formats (``StepFormat.live``)
also read the line still being drawn, so a bar is seen when it is drawn, not
when the next one replaces it: a count ending exactly where the bytes end is
left for later, since it may still be growing ("step 1" of "step 12"), and a
field cut there is left out. Other formats wait for the line's end: ``print``
without a buffer writes the text and its newline separately, and a line read
between the two would lose its trailing fields (a NaN loss). A line the stream
ends without terminating counts at :meth:`~LineScanner.end_of_stream`, for
every format.

Matching costs time linear in a line's length however it arrives. The line
still being drawn is carried between reads (its first ``max_line`` bytes) and
re-read only while it is short (:data:`LIVE_RETRY`) or when it has doubled
since it was last read, so a long line arriving in many small pieces is not
read again at every piece (that was quadratic). Finding where a line starts
and ends searches outwards in doubling windows, so a candidate line costs its
own length, not the distance to the next ``\\n`` of the read. The regexes
themselves are linear (see :mod:`stopstep_cli.patterns`). Measured, before ->
after: ``step 1 loss`` + 60,000 spaces + ``n/a``, fed whole, as text then
newline, or in 4 KiB pieces: more than 20 s (36-45 s at 30,000 spaces) -> 17 ms;
the same line with every preset active, in 16-byte pieces: 4.5 s -> 25 ms; an
endless Keras bar (60 KB) in 16-byte pieces: 1.4 s -> 25 ms.

A number too long to be a step (more than 18 digits) is not a step: the line
is skipped, and :attr:`LineScanner.notes` gets one message (once per scanner)
for the caller to show with ``-v``.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

from .observation import OUTPUT, Observation
from .patterns import MAX_STEP_DIGITS, NotAStep, StepFormat, clean_line

#: Bytes of one line that are read for a step; the rest passes through unread.
MAX_LINE = 64 * 1024

#: Step lines read per read, from its end (K). See the module docstring.
MAX_LINES_PER_READ = 64
#: Step lines read when the last K of a read do not rise step by step (ranks interleave,
#: a summary of earlier steps follows the last one): the highest step of the read may
#: be further back. See the module docstring.
MAX_LINES_INTERLEAVED = 4096
#: Candidate lines that match no format examined per read at most (lines holding an
#: anchor by chance: "parameters", "after"), so a step line followed by many of them
#: in one read is still read, and a read of them costs a bounded number of searches.
MAX_MISSES_PER_READ = 4096

#: A line still being drawn is re-read at every read while it is at most this
#: long (a progress bar is a few hundred bytes); longer, only each time it has
#: doubled, so that its total cost stays linear in its length.
LIVE_RETRY = 1024

# The first window a terminator search looks in; it doubles until it finds one.
_FIRST_WINDOW = 256


class LineVerdict:
    """What :meth:`LineScanner.read_line` made of one whole line.

    ``observation`` is the step it gives (None: none) and ``format`` the format
    that gave it (the first, in the formats' order, whose regex matches and whose
    conversion gives a step); ``context`` the format whose context rule the line
    is (Keras' ``Epoch 3/10``), if any; ``passed_over`` the formats whose regex
    matched it but that gave no step, each with why (an evaluation bar of
    another total, a Keras bar before any ``Epoch`` line, a number too long to
    be a step).
    """

    __slots__ = ("observation", "format", "context", "passed_over")

    def __init__(self) -> None:
        self.observation: Optional[Observation] = None
        self.format: Optional[StepFormat] = None
        self.context: Optional[StepFormat] = None
        self.passed_over: List[Tuple[StepFormat, str]] = []


class LineScanner:
    """Finds the steps in the reads of one stream.

    - ``feed(buf, n)``: the observations of the read ``buf[:n]``, in the order
      of their lines (the last ``max_lines`` candidate lines of the read, and the
      line still being drawn for progress-bar formats); an empty list if none.
    - ``end_of_stream()``: called once when the stream ends; the observation of
      a last line left without its terminator, if any (every format).
    - ``notes``: messages for the caller to show once, with ``-v`` (a number too
      long to be a step, at most once per scanner); the caller may clear it.
    - ``read_line(raw)``: one whole line, read as ``feed`` reads each line it
      examines, with what matched it (for ``stopstep scan``).
    """

    def __init__(self, formats: Sequence[StepFormat], source: str, max_line: int = MAX_LINE, kind: str = OUTPUT,
                 max_lines: Optional[int] = None):
        self.formats = tuple(formats)
        self.source = source
        self.kind = kind
        self.max_line = max_line
        self.max_lines = max(1, MAX_LINES_PER_READ if max_lines is None else max_lines)
        anchors = []
        for fmt in self.formats:
            anchors.extend(fmt.anchors)
        # One format without anchors makes every line a candidate.
        self.anchors: Optional[Tuple[bytes, ...]] = (
            tuple(dict.fromkeys(anchors)) if all(f.anchors for f in self.formats) else None
        )
        self._step_anchors = frozenset(self.anchors or ())
        self.contexts = tuple((f, f.context) for f in self.formats if f.context)
        self.context_anchors: Tuple[bytes, ...] = tuple(
            dict.fromkeys(a for _fmt, rule in self.contexts for a in rule.anchors))
        # What makes a line a candidate: a step anchor or a context anchor.
        self._walk_anchors: Optional[Tuple[bytes, ...]] = (
            None if self.anchors is None else tuple(dict.fromkeys(self.anchors + self.context_anchors)))
        # Formats read from a line still being drawn (progress bars); the others
        # wait for the line's end, so its fields (a NaN loss) are never cut off.
        self.live_formats = tuple(f for f in self.formats if f.live)
        self.states: Dict[str, dict] = {f.name: {} for f in self.formats}
        self.carry = bytearray()  # the unfinished line so far (first max_line bytes)
        self.carry_step: Optional[int] = None  # step already taken from it
        self._carry_read = 0  # len(carry) when it was last read as a partial line
        self.notes: List[str] = []
        self._noted_too_long = False
        self._now = 0.0

    # -- public -----------------------------------------------------------

    def feed(self, buf, n: int) -> List[Observation]:
        """Scan ``buf[:n]``: the observations of its lines, in the order of the lines."""
        out: List[Observation] = []
        self._now = time.monotonic()  # one read, one moment
        start = 0
        if self.carry:
            end = _find_terminator(buf, 0, n)
            if end < 0:
                if self._grow_carry(buf, 0, n):
                    self._read_partial(out)
                return out
            self._grow_carry(buf, 0, end)
            self._finish_carry(out)
            start = end + 1
        last = _rfind_terminator(buf, start, n)
        if last >= start:
            self._scan_complete(buf, start, last + 1, out)
        if last + 1 < n:  # an unfinished line: carried to the next read
            self._grow_carry(buf, last + 1, n)
            self._read_partial(out)
        return out

    def read_line(self, raw: bytes) -> LineVerdict:
        """One whole line (without its terminator), read exactly as :meth:`feed` reads
        each line it examines: its first ``max_line`` bytes, cleaned; its context applied
        to this scanner's state, then the first format that gives a step. The verdict says
        which format gave the step, and which matched but gave none.

        It reads every line it is given: it does not pass over lines the way ``feed``
        does when more than ``max_lines`` candidate lines come in one read (those are
        counted, not read; the highest step of a read is among its last lines)."""
        verdict = LineVerdict()
        raw = bytes(raw[: self.max_line])
        self._now = time.monotonic()
        if self.context_anchors:
            self._apply_context(raw, verdict)
        verdict.observation = self._match(raw, verdict=verdict)
        return verdict

    def end_of_stream(self) -> List[Observation]:
        """The stream has ended: a last line without a terminator counts now, for every format."""
        out: List[Observation] = []
        if self.carry:
            self._now = time.monotonic()
            self._finish_carry(out)
        return out

    # -- complete lines -----------------------------------------------------

    def _scan_complete(self, buf, a: int, b: int, out: List[Observation]) -> None:
        """The steps of the complete lines in ``buf[a:b]`` (``buf[b - 1]`` ends a line):
        the last ``max_lines`` candidate lines are read, in order; the ones before are
        only counted (estimated) in the first observation's ``coalesced``. When those
        lines do not rise step by step (ranks interleave), the read is read again with
        :data:`MAX_LINES_INTERLEAVED`, since its highest step may come before them."""
        first = len(out)
        saved = {name: dict(state) for name, state in self.states.items()} if self.context_anchors else None
        if not self._scan_window(buf, a, b, out, self.max_lines) or self.max_lines >= MAX_LINES_INTERLEAVED:
            return
        steps = [obs.step for obs in out[first:]]
        if all(x < y for x, y in zip(steps, steps[1:])):
            return  # one process flooding: the lines passed over came before, and lower
        del out[first:]
        if saved is not None:  # the context lines are read again, from where they stood
            for name, state in saved.items():
                self.states[name].clear()
                self.states[name].update(state)
        self._scan_window(buf, a, b, out, MAX_LINES_INTERLEAVED)

    def _scan_window(self, buf, a: int, b: int, out: List[Observation], max_lines: int) -> bool:
        """:meth:`_scan_complete` with a budget of ``max_lines`` step lines; whether it ran out."""
        window: List[Tuple[int, int, bool, bool]] = []
        pos, steps, misses = b, 0, 0
        max_line = self.max_line
        while pos > a and steps < max_lines and misses < MAX_MISSES_PER_READ:
            line = self._previous_candidate(buf, a, pos)
            if line is None:
                pos = a
                break
            line_start, line_end, anchored = line
            anchored = anchored and line_end - line_start <= max_line
            hit = self._could_be_step(bytes(buf[line_start:min(line_end, line_start + max_line)]), anchored)
            window.append((line_start, line_end, anchored, hit))
            steps, misses = steps + hit, misses + (not hit)
            pos = line_start
        first = len(out)
        if pos > a:  # the budget ran out: what comes before is counted, not read
            self._latest_context(buf, a, pos)
        for line_start, line_end, anchored, hit in reversed(window):
            raw = bytes(buf[line_start:min(line_end, line_start + max_line)])
            if hit:
                self._complete_line(raw, None, out, anchored)
            elif self.context_anchors:
                self._apply_context(raw)
        found = len(out) - first
        if pos > a and found:
            # Counting the step lines passed over would cost as much as a pass of
            # bytes.count over the read (1 ms a MiB here, most of a flooded read's
            # cost): estimated instead from how densely they came in what was read.
            out[first].coalesced += round((pos - a) * found / max(1, b - pos))
        return pos > a

    def _previous_candidate(self, buf, a: int, pos: int) -> Optional[Tuple[int, int, bool]]:
        """The last candidate line in ``buf[a:pos]`` (which ends with a terminator), as (start,
        end, whether a step anchor found it)."""
        anchors = self._walk_anchors
        if anchors is None:  # every non-empty line
            end = pos - 1
            while end >= a and buf[end] in (10, 13):
                end -= 1
            if end < a:
                return None
            return _rfind_terminator(buf, a, end) + 1, end + 1, False
        # The last hit of any anchor; each next anchor need only look past the
        # best so far, and the one that hit last time goes first.
        hit, hot = -1, None
        for anchor in anchors:
            found = buf.rfind(anchor, max(a, hit + 1), pos)
            if found > hit:
                hit, hot = found, anchor
        if hit < 0:
            return None
        if hot is not anchors[0]:
            self._walk_anchors = (hot,) + tuple(x for x in anchors if x is not hot)
        line_start = _rfind_terminator(buf, a, hit) + 1
        return line_start, _find_terminator(buf, hit, pos), hot in self._step_anchors

    def _could_be_step(self, raw: bytes, anchored: bool) -> bool:
        """Does some format's regex match this line? (Whether it makes a step depends
        on context too; this only says which lines are worth reading in order.)"""
        if self.anchors is not None and not anchored and not any(anchor in raw for anchor in self.anchors):
            return False
        text = clean_line(raw)
        return any(fmt.regex.search(text) is not None for fmt in self.formats)

    def _complete_line(self, raw: bytes, seen: Optional[int], out: List[Observation],
                       anchored: bool = False) -> None:
        """A whole line: its context, then its step (unless ``seen`` already from it).
        ``anchored``: a step anchor is known to be in it."""
        if self.context_anchors:
            self._apply_context(raw)
        obs = self._match(raw, anchored=anchored)
        if obs is not None and obs.step != seen:
            out.append(obs)

    # -- lines ------------------------------------------------------------

    def _match(self, raw: bytes, partial: bool = False, anchored: bool = False,
               verdict: Optional[LineVerdict] = None) -> Optional[Observation]:
        """The step in one line, if any; ``anchored``: a step anchor is known to be in it.
        ``verdict``: where to say which format gave it and which matched without a step."""
        if self.anchors is not None and not anchored:
            for anchor in self.anchors:
                if anchor in raw:
                    break
            else:
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
            try:
                step = fmt.to_step(match, self.states[fmt.name])
            except NotAStep:
                self._note_too_long(text)
                if verdict is not None:
                    verdict.passed_over.append((fmt, f"a number of more than {MAX_STEP_DIGITS} digits is not a step"))
                continue
            if step is not None:
                if verdict is not None:
                    verdict.format = fmt
                return Observation(step, fields, self.source, kind=self.kind, line=text.strip(), time=self._now)
            if verdict is not None:
                verdict.passed_over.append((fmt, _no_step_reason(fmt, match, self.states[fmt.name])))
        return None

    def _note_too_long(self, text: str) -> None:
        if self._noted_too_long:
            return
        self._noted_too_long = True
        line = text.strip()
        shown = line if len(line) <= 80 else line[:77] + "..."
        self.notes.append(f"{self.source}: a number of more than {MAX_STEP_DIGITS} digits where a step goes "
                          f"is not a step; skipped lines such as {shown!r}")

    # -- the unfinished line ------------------------------------------------

    def _read_partial(self, out: List[Observation]) -> None:
        """Read the line still being drawn, for the live formats, if it is worth reading again."""
        if not self.live_formats:
            return
        size = len(self.carry)
        if size == self._carry_read or (size > LIVE_RETRY and size < 2 * self._carry_read):
            return  # unchanged, or a long line that has not doubled since it was last read
        self._carry_read = size
        obs = self._match(bytes(self.carry), partial=True)
        if obs is None or obs.step == self.carry_step:
            return
        self.carry_step = obs.step
        out.append(obs)

    def _finish_carry(self, out: List[Observation]) -> None:
        line, seen = bytes(self.carry), self.carry_step
        self.carry.clear()
        self.carry_step = None
        self._carry_read = 0
        self._complete_line(line, seen, out)

    def _grow_carry(self, buf, a: int, b: int) -> bool:
        """Append ``buf[a:b]`` to the unfinished line, up to max_line; False if full."""
        room = self.max_line - len(self.carry)
        if room <= 0 or a >= b:
            return False
        self.carry += buf[a : min(b, a + room)]
        return True

    # -- context lines (Keras' "Epoch 3/10") -------------------------------

    def _latest_context(self, buf, a: int, b: int) -> None:
        """Apply the last context line of ``buf[a:b]`` (lines not examined one by one): a
        context line sets the state the lines after it are read in, so the last one is
        what they would have left. At most ``max_lines`` tries."""
        if not self.context_anchors:
            return
        pos = b
        for _ in range(self.max_lines):
            hit = max(buf.rfind(anchor, a, pos) for anchor in self.context_anchors)
            if hit < 0:
                return
            line_start = _rfind_terminator(buf, a, hit) + 1
            line_end = _find_terminator(buf, hit, b)
            if line_end < 0:
                line_end = b
            if self._apply_context(bytes(buf[line_start:min(line_end, line_start + self.max_line)])):
                return
            pos = line_start
            if pos <= a:
                return

    def _apply_context(self, raw: bytes, verdict: Optional[LineVerdict] = None) -> bool:
        """Apply ``raw`` if it is a context line; whether it was (``verdict.context``: whose)."""
        text = None
        applied = False
        for fmt, rule in self.contexts:
            if not any(anchor in raw for anchor in rule.anchors):
                continue
            text = text if text is not None else clean_line(raw)
            match = rule.regex.search(text)
            if match:
                try:
                    rule.apply(match, self.states[fmt.name])
                    applied = True
                    if verdict is not None:
                        verdict.context = fmt
                except NotAStep:
                    self._note_too_long(text)
        return applied


_COUNTING_GROUPS = ("step", "step2", "total")


def _no_step_reason(fmt: StepFormat, match, state: dict) -> str:
    """Why a line that a format's regex matched gave no step (for :class:`LineVerdict`)."""
    groups = match.re.groupindex
    locked = state.get("total")
    if "total" in groups and locked is not None and (match.group("total").lstrip("0") or "0") != str(locked):
        return f"its total {match.group('total')} is not the first bar's {locked}: another bar (evaluation?)"
    if fmt.context is not None and not state:
        return "no context line before it (Keras: no `Epoch E/T` line yet)"
    group = "step" if "step" in groups else 1 if match.re.groups == 1 else None
    text = match.group(group) if group is not None else None
    if group is not None and (text is None or not text.isdigit()):
        return "its step group did not match" if text is None else f"its step group holds {text[:20]!r}, not a number"
    return "the format gives no step for it"


def _ends_at(match, names, end: int) -> bool:
    """Does one of the counting groups (or the only group) end exactly at ``end``?"""
    groups = match.re.groupindex
    present = [name for name in names if name in groups] or ([1] if match.re.groups else [])
    return any(match.end(name) == end for name in present if match.start(name) >= 0)


def _find_terminator(buf, a: int, b: int) -> int:
    """Index of the first line terminator in ``buf[a:b]``, or -1.

    Looks in windows that double from ``a``, so the cost is the distance to
    the terminator found, not to the next ``\\n`` (a read of ``\\r``-separated
    bars may hold its only ``\\n`` a megabyte later)."""
    width = _FIRST_WINDOW
    while a < b:
        c = min(b, a + width)
        nl = buf.find(b"\n", a, c)
        cr = buf.find(b"\r", a, nl if nl >= 0 else c)
        if cr >= 0:
            return cr
        if nl >= 0:
            return nl
        a, width = c, width * 2
    return -1


def _rfind_terminator(buf, a: int, b: int) -> int:
    """Index of the last line terminator in ``buf[a:b]``, or ``a - 1``; windows double from ``b``."""
    width = _FIRST_WINDOW
    while b > a:
        c = max(a, b - width)
        nl = buf.rfind(b"\n", c, b)
        cr = buf.rfind(b"\r", max(c, nl + 1), b)
        if cr >= 0:
            return cr
        if nl >= 0:
            return nl
        b, width = c, width * 2
    return a - 1
