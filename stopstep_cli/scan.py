r"""``stopstep scan``: what ``stopstep run`` would read from a saved log and a
checkpoint directory, and why it did not see a step it should have.

A log is read with the same :class:`~stopstep_cli.scanner.LineScanner` and the
same formats as ``run`` (``patterns.resolve_formats``), line by line, through
:meth:`~stopstep_cli.scanner.LineScanner.read_line`: the call ``feed`` makes for
each line it examines, so the cleaning (ANSI codes, backspaces, a
``[rank0]:`` prefix), the first 64 KiB of a line, the order of the formats, the
state a format keeps (the first tqdm total ``hf`` locks onto, Keras'
``Epoch E/T``) and the conversion to a step are run's own. Lines end at ``\n``
or ``\r``, as in run; a line number is the 1-based number of ``\n`` before it
plus one, as an editor or ``sed -n Np`` counts, so the ``\r``-drawn updates of
one progress bar share the number of its line.

Where a run and the scan can differ: run reads the command's stdout and stderr
each with its own scanner (a saved ``2>&1`` log mixes them into one), and when a
single read brings more than 64 candidate lines it reads only the last 64 of
them (the highest step of a read is among its last lines; see
:mod:`stopstep_cli.scanner`). The scan reads every line.

The file is read in 1 MiB pieces and only lines holding a format's literal
anchor, or a hint that they might be a step, are looked at, so memory stays
flat whatever the log (measured: a 110 MB log of 2 million lines, three in four
of them steps or bars, in 16 s with 19 MB resident, on a shared 2-core Xeon).

A checkpoint directory is surveyed with the layout's own completeness check
(:meth:`~stopstep_cli.layouts.Layout.why_incomplete`, the check
:meth:`~stopstep_cli.layouts.Layout.is_complete` is made of), once, the
candidates in the order of their steps as a run checks them.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import UsageError
from .layouts import LAYOUT_NAMES, Layout, detect_layout, make_layout
from .patterns import DEFAULT_FORMAT, PRESETS, StepFormat, clean_line
from .scanner import LineScanner, LineVerdict, _find_terminator, _rfind_terminator

#: Bytes read at a time.
CHUNK = 1 << 20
#: Kinds of lines shown per list (the rest are counted).
SHOWN = 5
#: Distinct kinds of lines remembered per list: memory stays bounded whatever the log.
MAX_KINDS = 200
#: Characters of a line shown.
TEXT_WIDTH = 160

#: What "looked like a step" means: a line that gave no step and is no context line,
#: but holds a word beginning with ``step``, ``iter`` or ``epoch`` (``global_step``,
#: ``Iteration``, ``Epoch`` count; ``timestep`` does not), ``num_updates``, a count
#: ``n/total`` (``45/100``, ``100/ 1000``) or a tqdm bar's ``%|``. Searched in the
#: lowercased text, each word then checked for a letter before it (a leading lookbehind,
#: or re.IGNORECASE, makes ``re`` try every position: ten times slower on long lines).
_LOOKS = re.compile(r"step|iter|epoch|num_updates|\d[ \t]*/[ \t]*\d|%\|")
_WORDS = frozenset(("step", "iter", "epoch"))
# The same hints on raw bytes, looser (no ANSI stripping yet): which lines are worth a look.
# A line with an escape code is always looked at: a colour code can split any of the words.
_HINTS = rb"step|iter|epoch|num_updates|\d[ \t]*/[ \t]*\d|%\||\x1b"

# A line's kind: its bytes less digits, blanks, a bar's blocks ('#', anything past ASCII)
# and control bytes, so that lines with other numbers or a bar filled otherwise are of one kind.
_SHAPE_DROP = bytes(range(0, 0x21)) + b"0123456789#" + bytes(range(0x7F, 0x100))


def looks_like_a_step(text: str) -> bool:
    """Does a (cleaned) line look like a step? See :data:`_LOOKS`: a word beginning with
    ``step``, ``iter`` or ``epoch`` (not inside another word: ``global_step`` and
    ``Iteration`` do, ``timestep`` does not), ``num_updates``, a count ``n/total`` or ``%|``."""
    low = text.lower()
    for hit in _LOOKS.finditer(low):
        at = hit.start()
        if hit.group() in _WORDS and at and "a" <= low[at - 1] <= "z":
            continue  # inside another word
        return True
    return False


def _shown(text: str) -> str:
    text = text.strip()
    if not text.isprintable():  # a binary log's bytes: escaped, never sent to the terminal raw
        text = ascii(text)[1:-1]
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 3] + "..."


def _shape(raw: bytes) -> bytes:
    """Lines of one kind (the same words, other numbers, a bar filled otherwise) share a shape."""
    return raw[:200].translate(None, _SHAPE_DROP)[:40]


def format_option(fmt: StepFormat) -> str:
    """How a format is asked for on the command line."""
    if fmt is DEFAULT_FORMAT:
        return "the default set"
    if fmt.description == "--pattern":
        return f"--pattern {_quote(fmt.source)}"
    return f"--preset {fmt.name}"


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# -- what was seen --------------------------------------------------------------------------


class Sighting:
    """One line: its step (if any), its line number and its text; ``presets``: for a line
    that matched nothing, the presets not in use that would read it."""

    __slots__ = ("step", "line", "text", "presets")

    def __init__(self, step: Optional[int], line: int, text: str, presets: Optional[List[str]] = None):
        self.step, self.line, self.text, self.presets = step, line, _shown(text), presets

    def to_dict(self) -> dict:
        out = {"line": self.line, "text": self.text}
        if self.step is not None:
            out = {"step": self.step, **out}
        if self.presets is not None:
            out["presets"] = self.presets
        return out


class Kinds:
    """Lines counted by kind (a shape, or a reason), the first of each kept as its example."""

    def __init__(self) -> None:
        self.count = 0
        self._kinds: Dict[object, list] = {}  # key -> [count, first Sighting]

    def add(self, key, line: int, text: str, presets: Optional[Callable[[str], List[str]]] = None) -> None:
        """Count a line of kind ``key``; ``presets(text)``, asked for the first line of a kind,
        names the presets that would read it."""
        self.count += 1
        kind = self._kinds.get(key)
        if kind is not None:
            kind[0] += 1
        elif len(self._kinds) < MAX_KINDS:
            self._kinds[key] = [1, Sighting(None, line, text, presets(text) if presets else None)]

    def top(self, n: int = SHOWN) -> List[Tuple[object, int, Sighting]]:
        """The ``n`` most frequent kinds (earliest first among equals)."""
        ranked = sorted(self._kinds.items(), key=lambda item: (-item[1][0], item[1][1].line))
        return [(key, count, first) for key, (count, first) in ranked[:n]]

    @property
    def kinds(self) -> int:
        return len(self._kinds)


class FormatTally:
    """What one format made of a log."""

    def __init__(self, fmt: StepFormat):
        self.format = fmt
        self.lines = 0  # lines that gave a step through this format
        self.first: Optional[Sighting] = None
        self.last: Optional[Sighting] = None
        self.highest: Optional[Sighting] = None
        self.context_lines = 0  # lines that set its context (Keras' "Epoch E/T")
        self.passed_over = Kinds()  # lines its regex matched that gave no step, by reason

    def saw(self, step: int, line: int, text: str) -> None:
        self.lines += 1
        self.last = Sighting(step, line, text)
        if self.first is None:
            self.first = self.last
        if self.highest is None or step > self.highest.step:
            self.highest = self.last

    def to_dict(self) -> dict:
        return {
            "name": self.format.name,
            "option": format_option(self.format),
            "lines": self.lines,
            "first": self.first and self.first.to_dict(),
            "last": self.last and self.last.to_dict(),
            "highest": self.highest and self.highest.to_dict(),
            "context_lines": self.context_lines,
            "passed_over": {
                "count": self.passed_over.count,
                "kinds": [{"why": why, "count": count, **first.to_dict()}
                          for why, count, first in self.passed_over.top()],
            },
        }


class LogScan:
    """What run would read from one log: per format, and the lines that looked like a step."""

    def __init__(self, path: str, formats: Sequence[StepFormat]):
        self.path = path
        self.tallies = [FormatTally(fmt) for fmt in dict.fromkeys(formats)]
        self.unmatched = Kinds()
        self.lines = 0

    @property
    def highest(self) -> Optional[Tuple[Sighting, StepFormat]]:
        best = None
        for tally in self.tallies:
            if tally.highest is not None and (best is None or tally.highest.step > best[0].step):
                best = (tally.highest, tally.format)
        return best

    def to_dict(self) -> dict:
        best = self.highest
        return {
            "path": self.path,
            "lines": self.lines,
            "step": best[0].step if best else None,
            "formats": [tally.to_dict() for tally in self.tallies],
            "unmatched": {
                "count": self.unmatched.count,
                "kinds": [{"count": count, **first.to_dict()} for _key, count, first in self.unmatched.top()],
            },
        }


# -- reading a log --------------------------------------------------------------------------


class _Lines:
    """Splits a byte stream where the scanner does (``\\n`` and ``\\r``), keeps the first
    ``max_line`` bytes of each line, and hands out the lines in which a ``hits`` regex
    finds something (in their lowercased bytes), as (line number, bytes); each line's
    terminator is not part of it.
    The line under way at the end of a piece is carried (its first ``max_line`` bytes)
    and handed out whole once it ends. Line numbers count ``\\n`` only."""

    def __init__(self, hits: "re.Pattern[bytes]", max_line: int):
        self.hits, self.max_line = hits, max_line
        self.newlines = 0
        self.carry = bytearray()
        self.carry_line = 0
        self.open = False  # a line is under way at the end of the last piece
        self.last_byte: Optional[int] = None

    def feed(self, data: bytes) -> Iterator[Tuple[int, bytes]]:
        n = len(data)
        if not n:
            return
        self.last_byte = data[-1]
        pos = 0
        if self.open:
            end = _find_terminator(data, 0, n)
            if end < 0:
                self._grow(data, 0, n)
                return
            self._grow(data, 0, end)
            self.open = False
            line = bytes(self.carry)
            self.carry.clear()
            yield self.carry_line, line
            if data[end] == 10:
                self.newlines += 1
            pos = end + 1
        last = _rfind_terminator(data, pos, n)
        if last >= pos:
            stop = last + 1
            counted = at = pos
            search = self.hits.search
            lowered = data.lower()  # the same length: positions carry over
            while at < stop:
                hit = search(lowered, at, stop)
                if hit is None:
                    break
                start = _rfind_terminator(data, at, hit.start()) + 1
                end = _find_terminator(data, hit.start(), stop)  # found: data[last] ends a line
                self.newlines += data.count(b"\n", counted, start)
                counted = start
                yield self.newlines + 1, data[start:min(end, start + self.max_line)]
                at = end + 1
            self.newlines += data.count(b"\n", counted, stop)
            pos = stop
        if pos < n:
            self.open = True
            self.carry_line = self.newlines + 1
            self._grow(data, pos, n)

    def end(self) -> Iterator[Tuple[int, bytes]]:
        """The stream has ended: a last line without a terminator."""
        if self.open:
            self.open = False
            line = bytes(self.carry)
            self.carry.clear()
            yield self.carry_line, line

    @property
    def count(self) -> int:
        """Lines so far, an unterminated last one included."""
        return self.newlines + (1 if self.last_byte is not None and self.last_byte != 10 else 0)

    def _grow(self, data: bytes, a: int, b: int) -> None:
        room = self.max_line - len(self.carry)
        if room > 0:
            self.carry += data[a : min(b, a + room)]


def _hits_regex(scanner: LineScanner) -> "re.Pattern[bytes]":
    """Which lines can give a step (a format's anchor), set a context, or look like a step: a
    regex for the lowercased bytes (2-3 times faster than re.IGNORECASE), a superset of them."""
    if scanner.anchors is None:  # a format without a literal: every line is read
        return re.compile(rb"[^\r\n]")
    literals = dict.fromkeys(a.lower() for a in scanner.anchors + scanner.context_anchors)
    return re.compile(b"|".join([re.escape(a) for a in literals] + [_HINTS]))


def scan_stream(read: Callable[[int], bytes], formats: Sequence[StepFormat], path: str = "-",
                on_line: Optional[Callable[[int, bytes, LineVerdict], None]] = None) -> LogScan:
    """Read a whole log through ``read(size)`` (b"" at its end) as run would read it.
    ``on_line(number, raw, verdict)`` is called for each line read (lines that hold
    neither a format's anchor nor a hint of a step are not read: they cannot give one)."""
    result = LogScan(path, formats)
    scanner = LineScanner(formats, path)
    others = [fmt for _name, fmt in sorted(PRESETS.items()) if fmt not in formats]

    def readers(text: str) -> List[str]:
        """The presets not in use whose regex (or context rule) matches a line that matched nothing."""
        return [fmt.name for fmt in others
                if fmt.regex.search(text) or (fmt.context is not None and fmt.context.regex.search(text))]

    tallies = {tally.format: tally for tally in result.tallies}
    lines = _Lines(_hits_regex(scanner), scanner.max_line)

    def take(pieces: Iterator[Tuple[int, bytes]]) -> None:
        for number, raw in pieces:
            verdict = scanner.read_line(raw)
            if on_line is not None:
                on_line(number, raw, verdict)
            if verdict.context is not None:
                tallies[verdict.context].context_lines += 1
            if verdict.observation is not None:
                tallies[verdict.format].saw(verdict.observation.step, number, verdict.observation.line)
            elif verdict.passed_over:
                text = clean_line(raw)
                for fmt, why in verdict.passed_over:
                    tallies[fmt].passed_over.add(why, number, text)
            elif verdict.context is None:
                text = clean_line(raw)
                if looks_like_a_step(text):
                    result.unmatched.add(_shape(raw), number, text, readers)

    while True:
        data = read(CHUNK)
        if not data:
            break
        take(lines.feed(data))
    take(lines.end())
    scanner.notes.clear()
    result.lines = lines.count
    return result


def scan_log(path: str, formats: Sequence[StepFormat]) -> LogScan:
    """Scan the log at ``path`` (``-``: stdin). UsageError when it cannot be read."""
    if path == "-":
        def read_stdin(size: int) -> bytes:
            try:
                return os.read(0, size)
            except OSError as exc:
                raise UsageError(f"cannot read stdin: {exc.strerror or exc}") from None

        return scan_stream(read_stdin, formats, "-")
    check_log_path(path)
    try:
        fh = open(path, "rb", buffering=0)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        def read_file(size: int) -> bytes:
            try:
                return fh.read(size)
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None

        return scan_stream(read_file, formats, path)


def check_log_path(path: str) -> None:
    """A FILE that cannot be scanned is a usage error, said before anything is read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path} is a directory (for checkpoints: --checkpoint-dir {_quote(path)})")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read {path}: permission denied")


# -- surveying a checkpoint directory -----------------------------------------------------


class Candidate:
    """An entry of a checkpoint directory that names a step."""

    __slots__ = ("name", "path", "step", "why")

    def __init__(self, name: str, path: str, step: int, why: Optional[str]):
        self.name, self.path, self.step, self.why = name, path, step, why

    @property
    def complete(self) -> bool:
        return self.why is None

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "step": self.step, "complete": self.complete,
                "why": self.why}


class CheckpointSurvey:
    """What a run would take from a checkpoint directory: each candidate, complete or why not."""

    def __init__(self, path: str, layout: Optional[Layout], detected: bool, entries: int):
        self.path, self.layout, self.detected, self.entries = path, layout, detected, entries
        self.candidates: List[Candidate] = []
        self.ignored: List[Tuple[str, str]] = []  # (name, why)

    @property
    def latest(self) -> Optional[Candidate]:
        complete = [c for c in self.candidates if c.complete]
        return max(complete, key=lambda c: c.step) if complete else None

    def to_dict(self) -> dict:
        latest = self.latest
        return {
            "path": self.path,
            "layout": self.layout.name if self.layout else None,
            "detected": self.detected,
            "entries": self.entries,
            "step": latest.step if latest else None,
            "checkpoints": [c.to_dict() for c in self.candidates],
            "ignored": [{"name": name, "why": why} for name, why in self.ignored],
        }


def check_checkpoint_dir(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UsageError(f"--checkpoint-dir {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"--checkpoint-dir {path} is not a directory")


def survey_checkpoints(path: str, layout: str = "auto", pattern: Optional[str] = None) -> CheckpointSurvey:
    """Each checkpoint candidate in ``path`` with its step and whether it is complete, and if
    not why, by ``layout`` (``auto``: the one the entries show, as run detects it);
    ``pattern``: ``--checkpoint-pattern`` (the generic layout on relative paths)."""
    if layout != "auto" and layout not in LAYOUT_NAMES:
        raise UsageError(f"unknown layout {layout!r}; choose from auto, {', '.join(LAYOUT_NAMES)}")
    check_checkpoint_dir(path)
    recursive = pattern is not None and "/" in pattern
    try:
        names = sorted(_names(path, recursive))
    except OSError as exc:
        raise UsageError(f"--checkpoint-dir {path}: {exc.strerror or exc}") from None
    chosen = None if (layout == "auto" and pattern is None) else make_layout(layout, pattern)
    detected = chosen is None
    if chosen is None:
        chosen = detect_layout(names)
    survey = CheckpointSurvey(path, chosen, detected, len(names))
    if chosen is None:
        return survey
    found = []
    for name in names:
        step = chosen.step_of(name)
        if step is not None:
            found.append((step, name))
        elif chosen.ignore_re.search(name):
            survey.ignored.append((name, "a temporary name, never counted"))
    for step, name in sorted(found):  # in the order of their steps, as a run checks them
        try:
            why = chosen.why_incomplete(path, name, step)
        except Exception as exc:  # a check that fails is reported, not a traceback
            why = f"the check failed ({type(exc).__name__}: {exc})"
        shown = os.path.join(path, chosen.checkpoint_name(name))
        survey.candidates.append(Candidate(chosen.checkpoint_name(name), shown, step, why))
    return survey


def _names(root: str, recursive: bool) -> Iterator[str]:
    """The entry names run lists: the directory's own, or every relative path for a
    ``--checkpoint-pattern`` with a ``/``."""
    if not recursive:
        with os.scandir(root) as entries:
            for entry in entries:
                yield entry.name
        return
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        for name in dirs + files:
            yield name if rel == "." else os.path.join(rel, name)


# -- the whole answer ---------------------------------------------------------------------


class ScanResult:
    """The logs and checkpoint directories of one ``stopstep scan``."""

    def __init__(self, formats: Sequence[StepFormat], logs: Sequence[LogScan] = (),
                 surveys: Sequence[CheckpointSurvey] = ()):
        self.formats = list(dict.fromkeys(formats))
        self.logs, self.surveys = list(logs), list(surveys)

    @property
    def step(self) -> Optional[int]:
        steps = [log.highest[0].step for log in self.logs if log.highest]
        steps += [survey.latest.step for survey in self.surveys if survey.latest]
        return max(steps) if steps else None

    @property
    def found(self) -> bool:
        return self.step is not None

    def to_dict(self) -> dict:
        return {
            "found": self.found,
            "step": self.step,
            "formats": [{"name": fmt.name, "option": format_option(fmt)} for fmt in self.formats] if self.logs else [],
            "logs": [log.to_dict() for log in self.logs],
            "checkpoint_dirs": [survey.to_dict() for survey in self.surveys],
        }

    def render(self) -> List[str]:
        """The answer for a person, line by line."""
        out: List[str] = []
        for log in self.logs:
            out += _render_log(log)
        for survey in self.surveys:
            out += _render_survey(survey)
        if not self.found:
            out.append("no step found")
        return out


def _n(count: int, word: str, plural: str = "") -> str:
    return f"{count:,} {word if count == 1 else plural or word + 's'}"


def _at(sighting: Sighting) -> str:
    return f"{sighting.step:,} at line {sighting.line:,}"


def _render_log(log: LogScan) -> List[str]:
    name = "stdin" if log.path == "-" else log.path
    out = [f"{name}: {_n(log.lines, 'line')}"]
    width = max(len(format_option(t.format)) for t in log.tallies)
    for tally in log.tallies:
        label = format_option(tally.format).ljust(width)
        if tally.lines:
            out.append(f"  {label}  {_n(tally.lines, 'line')} with a step: first step {_at(tally.first)}, "
                       f"last {_at(tally.last)}, highest {_at(tally.highest)}")
        else:
            out.append(f"  {label}  no line with a step")
        if tally.context_lines:
            out.append(f"      {_n(tally.context_lines, 'context line')} (Epoch E/T)")
        if tally.passed_over.count:
            out.append(f"      {_n(tally.passed_over.count, 'line')} matched but gave no step:")
            for why, count, first in tally.passed_over.top():
                out.append(f"        {count:,} x {why}; first at line {first.line:,}: {first.text}")
    if log.unmatched.count:
        kinds = log.unmatched.kinds
        more = f", {kinds} kinds" if kinds > 1 else ""
        out.append(f"  looked like a step but matched no format: {_n(log.unmatched.count, 'line')}{more}")
        for _shape_key, count, first in log.unmatched.top():
            out.append(f"    {count:,} x like line {first.line:,}: {first.text}")
            if first.presets:
                readers = " or ".join(f"--preset {name}" for name in first.presets)
                out.append(f"        {readers} would read {'it' if count == 1 else 'them'}")
        if kinds > SHOWN:
            out.append(f"    ... and {kinds - SHOWN} more kinds")
    best = log.highest
    if best:
        sighting, fmt = best
        out.append(f"  highest step {sighting.step:,} at line {sighting.line:,} ({format_option(fmt)})")
    return out


def _render_survey(survey: CheckpointSurvey) -> List[str]:
    if survey.layout is None:
        what = "empty" if not survey.entries else (
            f"no layout recognised among its {_n(survey.entries, 'entry', 'entries')}")
        return [f"{survey.path}: {what}",
                "  give --layout NAME (generic: the last number in any name) or --checkpoint-pattern"]
    how = "detected" if survey.detected else "given"
    out = [f"{survey.path}: layout {survey.layout.name} ({how}), {_n(len(survey.candidates), 'checkpoint')}"]
    if survey.layout.counts != "steps":
        out.append(f"  the number counts {survey.layout.counts}")
    width = max([len(c.name) for c in survey.candidates] + [len(n) for n, _ in survey.ignored] + [1])
    for c in survey.candidates:
        state = "complete" if c.complete else f"not complete: {c.why}"
        out.append(f"  {c.name.ljust(width)}  step {c.step:<8,}  {state}")
    for name, why in survey.ignored:
        out.append(f"  {name.ljust(width)}  {'':<13}  ignored: {why}")
    latest = survey.latest
    if latest:
        out.append(f"  latest complete checkpoint: step {latest.step:,} ({latest.name})")
    return out
