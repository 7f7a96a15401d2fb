r"""Step formats: how a line of output turns into a global step.

A :class:`StepFormat` is data: a regex matched against one cleaned line, the
literal *anchors* that any matching line must contain (so that the output pump
can skip whole reads with a fast ``bytes.find`` before running any regex), and
a small conversion from the match to a global step. The framework presets are
listed once, in :data:`PRESETS`; each preset's regex follows its framework's
own logging code (what it prints, and whether the step is printed before or
after the update).

Matching time must not depend on how a hostile line is shaped, because the
output pump stops while a regex runs. So:

- Every built-in regex is written for Python's backtracking ``re`` (3.9 has no
  possessive quantifiers or atomic groups) such that each character can be
  taken by only one quantifier: no ``\s*[:=]?\s*`` (both ``\s*`` can take
  the same space: quadratic when what follows fails), no ``\d+\.?\d*`` (same
  with digits), and a lazy ``.*?`` is only ever followed by a literal. Checked
  with adversarial lines of 64 KiB (spaces, digits, repeated anchors and
  ``loss`` words, every prefix of each sample followed by each filler): each
  regex takes under a few milliseconds there, growing linearly.
- A user's ``--pattern`` can be anything, so it is matched with RE2
  (``google-re2``), whose time is linear in the line whatever the pattern.
  Measured on a 2-core Xeon, per ordinary line (search, values and step):
  ``gs=(?P<step>\d+) loss=(?P<loss>\S+)`` 2.7-4 us with ``re``, 9.5 us with
  RE2 through this module's adapter; ``(?i)at update (\d+)`` 1.7 us vs 5 us
  (2.1 vs 2.8 us on a line it does not match). The pathological
  ``(a+)+b(?P<step>\d+)``: ``re`` takes 0.13 s on 20 ``a``s, 0.55 s on 22,
  1.9 s on 24 (doubling with every character), so bounding the text ``re``
  sees cannot help: a bound short enough to be safe (about 16 characters) is
  shorter than a log line, and a merely polynomial pattern
  (``step\s*\s*:?\s*(?P<step>\d+)x``) took 275 s on 4,000 spaces. RE2
  takes 0.11 ms on 60,000 ``a``s, 2.5 ms on those 4,000 spaces. So RE2: a few
  microseconds more per line is what a run printing even thousands of lines a
  second can afford, and a hang is not. RE2 has no lookarounds,
  backreferences, conditionals, atomic groups, possessive quantifiers, ``\Z``,
  verbose mode or repetition counts above 1000; a pattern using them is
  refused with a :class:`PatternError` naming the feature (running it would
  need the backtracking engine this avoids). RE2's ``\d``, ``\w``, ``\s`` and
  ``\b`` are ASCII-only.
- A number longer than :data:`MAX_STEP_DIGITS` significant digits is not a
  step: the conversions raise :class:`NotAStep`, which the scanner notes once
  and skips (``int()`` refuses more than 4,300 digits in Python 3.11+, and no
  training runs 10**18 steps).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

# ANSI escape sequences (CSI and two-byte ESC forms) and backspaces, removed
# before matching: coloured loggers and Keras' redraws put them mid-line.
ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|\x08")
# torchrun --tee / --role prefixes: "[rank0]:", "[default3]:".
RANK_PREFIX_RE = re.compile(r"^\[[A-Za-z_]*\d+\]:\s?")

Fields = Dict[str, object]


#: A step has at most this many significant digits; a longer number is not a step.
MAX_STEP_DIGITS = 18


class PatternError(ValueError):
    """A user pattern that cannot be used; the message says why."""


class NotAStep(ValueError):
    """A number where a step goes that is too long to be one (see :data:`MAX_STEP_DIGITS`)."""


def step_int(text) -> int:
    """A step from its digits; :class:`NotAStep` past :data:`MAX_STEP_DIGITS` significant digits.

    Checked before ``int()``: Python 3.11+ refuses to convert more than 4,300
    digits (a ``ValueError`` that used to crash stopstep), and the conversion is
    quadratic in the number of digits on older versions."""
    if text is None:  # an optional group that did not take part
        raise TypeError("no step")
    digits = text.lstrip("0")
    if len(digits) > MAX_STEP_DIGITS:
        if digits.isdecimal():
            raise NotAStep(f"a number of {len(digits)} digits")
        raise ValueError(f"not a step: {text[:40]!r}")
    if not digits and text:
        return 0
    return int(digits)


def clean_line(raw: bytes) -> str:
    """Decode one line leniently and strip what hides the step from a regex."""
    text = raw.decode("utf-8", "replace")
    if "\x1b" in text or "\x08" in text:
        text = ANSI_RE.sub("", text)
    if text.startswith("["):
        text = RANK_PREFIX_RE.sub("", text, count=1)
    return text


def number_or_text(text: str) -> object:
    """A field's value: a float when the text reads as one, else the text."""
    try:
        return float(text)
    except ValueError:
        return text


def _plain_step(match: re.Match, state: dict) -> Optional[int]:
    return step_int(match.group("step"))


def _plus_one(match: re.Match, state: dict) -> Optional[int]:
    # The number printed is the step about to run, or read before the update.
    step = step_int(match.group("step")) + 1
    if step >= 10 ** MAX_STEP_DIGITS:
        raise NotAStep(match.group("step")[:40])
    return step


def _scientific_step(match: re.Match, state: dict) -> Optional[int]:
    # fairseq prints num_updates >= 1e6 as "1e+06" (6 significant digits).
    value = float(match.group("step"))
    if not math.isfinite(value) or value >= 10 ** MAX_STEP_DIGITS:
        raise NotAStep(match.group("step")[:40])
    return int(value)


def _locked_total(match: re.Match, state: dict) -> Optional[int]:
    # The training bar comes first; evaluation bars look alike but count
    # something else, so only bars with the first total seen are steps.
    total = step_int(match.group("total"))
    locked = state.setdefault("total", total)
    return step_int(match.group("step")) if total == locked else None


def _keras_step(match: re.Match, state: dict) -> Optional[int]:
    epoch = state.get("epoch")
    if epoch is None:
        return None
    step = (epoch - 1) * step_int(match.group("total")) + step_int(match.group("step"))
    if step >= 10 ** MAX_STEP_DIGITS:
        raise NotAStep(f"epoch {epoch} of {match.group('total')}")
    return step


def _lightning_step(match: re.Match, state: dict) -> Optional[int]:
    # "Epoch E: ... n/total": n batches done in the 0-based epoch E of total batches each.
    step = step_int(match.group("epoch")) * step_int(match.group("total")) + step_int(match.group("step"))
    if step >= 10 ** MAX_STEP_DIGITS:
        raise NotAStep(f"epoch {match.group('epoch')} of {match.group('total')}")
    return step


def _keras_epoch(match: re.Match, state: dict) -> None:
    state["epoch"] = step_int(match.group("epoch"))


class ContextRule:
    """A line that carries no step but changes how later steps are counted
    (Keras' ``Epoch 3/10``)."""

    def __init__(self, source: str, anchors: Tuple[bytes, ...], apply: Callable[[re.Match, dict], None]):
        self.source, self.anchors, self.apply = source, anchors, apply
        self._regex: Optional[re.Pattern] = None

    @property
    def regex(self) -> re.Pattern:
        if self._regex is None:
            self._regex = re.compile(self.source)
        return self._regex


class StepFormat:
    """One way a global step shows up in a line of output.

    ``source`` is the regex (compiled on first use: a run pays only for the
    formats it reads); ``anchors`` are literals every matching line contains
    (empty: every line is a candidate); ``to_step(match, state)`` gives the
    step; ``live`` formats are also read while their line is still being
    drawn (progress bars); ``context`` is a line that changes later steps.
    """

    def __init__(self, name: str, source: str, anchors: Tuple[bytes, ...],
                 to_step: Callable[[re.Match, dict], Optional[int]] = None, sample: str = "",
                 description: str = "", context: Optional[ContextRule] = None, flags: int = 0,
                 live: bool = False):
        self.name, self.source, self.anchors = name, source, tuple(anchors)
        self.to_step = to_step or _plain_step
        self.sample, self.description, self.context = sample, description, context
        self.flags, self.live = flags, live
        self._regex: Optional[re.Pattern] = None

    @property
    def regex(self) -> re.Pattern:
        if self._regex is None:
            self._regex = re.compile(self.source, self.flags)
        return self._regex

    def fields(self, match: re.Match) -> Fields:
        """Named groups other than the step, numbers where they parse."""
        return {
            name: number_or_text(value)
            for name, value in match.groupdict().items()
            if not name.startswith("step") and name != "total" and value is not None
        }

    def __repr__(self) -> str:
        return f"StepFormat({self.name!r}, {self.source!r})"


def _fmt(name, regex, anchors, sample, description, to_step=_plain_step, context=None, flags=0, live=False):
    return StepFormat(
        name=name,
        source=regex,
        flags=flags,
        live=live,
        anchors=tuple(a.encode() for a in anchors),
        to_step=to_step,
        sample=sample,
        description=description,
        context=context,
    )


# "\d+(?:\.\d*)?" and not "\d+\.?\d*": in the latter both runs of digits can take
# the same digits, which is quadratic when what follows the number fails (tf).
_LOSS = r"(?P<loss>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf|NaN|Inf))"

# The default set: the common plain forms and nothing looser. The anchors are
# "tep" and "ter" so that one case-insensitive first letter costs nothing.
DEFAULT_FORMAT = _fmt(
    "default",
    r"(?<![A-Za-z0-9_])(?:global_step|[Ss]tep|[Ii]ter(?:ation)?)"
    r"(?:\s*[:=]\s*|\s+)(?P<step>\d+)(?!\d|\.\d)"
    # "\s*(?:[:=]\s*)?", not "\s*[:=]?\s*": the two \s* could share the spaces
    # ("loss" + 60,000 spaces + "n/a" took 90 s).
    r"(?:.*?\bloss\s*(?:[:=]\s*)?" + _LOSS + r")?",
    ["tep", "ter"],
    "step 10 loss 2.31",
    "step 10, Step: 10, step=10, global_step = 10, iter 10, iteration 10",
)

PRESETS: Dict[str, StepFormat] = {
    f.name: f
    for f in (
        _fmt(
            "hf",
            r"^\s*\d+%\|[^|]*\|\s*(?P<step>\d+)/(?P<total>\d+) \[",
            ["%|"],
            " 10%|█         | 100/1000 [00:25<03:45,  4.00it/s]",
            "Hugging Face Trainer tqdm bar on stderr; locks onto the first bar's total",
            _locked_total,
            live=True,
        ),
        _fmt(
            "tf",
            r"\bloss = " + _LOSS + r", step = (?P<step>\d+)",
            ["step = "],
            "INFO:tensorflow:loss = 0.22, step = 100 (0.812 sec)",
            "TF Estimator / LoggingTensorHook; the step is read before the update (done = N+1)",
            _plus_one,
        ),
        _fmt(
            "deepspeed",
            r"(?:\[Rank 0\] step=(?P<step>\d+), skipped=|\bsteps: (?P<step2>\d+) loss: " + _LOSS + ")",
            ["step=", "steps: "],
            "[Rank 0] step=10, skipped=0, lr=[0.0001], mom=[(0.9, 0.999)]",
            "DeepSpeed engine and pipeline engine progress lines",
            lambda m, s: step_int(m.group("step") or m.group("step2")),
        ),
        _fmt(
            "megatron",
            r"\biteration\s+(?P<step>\d+)/\s*(?P<total>\d+) \|(?:.*?lm loss: " + _LOSS + ")?",
            ["iteration"],
            " iteration      100/    1000 | consumed samples: 3200 | lm loss: 2.345E+00 |",
            "Megatron-LM training log",
        ),
        _fmt(
            "torchtitan",
            r"(?<!validate )\bstep:\s*(?P<step>\d+)\s+loss:\s*" + _LOSS,
            ["step:"],
            "[rank0]:[titan] 2025-01-01 12:00:00,000 - root - INFO - step: 10  loss:  7.1234  memory: 1.2GiB",
            "torchtitan training lines (validation lines are ignored)",
        ),
        _fmt(
            "nanogpt",
            r"^iter (?P<step>\d+): loss " + _LOSS,
            ["iter "],
            "iter 100: loss 2.3456, time 123.45ms, mfu 35.12%",
            "nanoGPT; printed after the update of iteration N, so N+1 steps are done",
            _plus_one,
        ),
        _fmt(
            "mmengine",
            r"Iter\(train\)\s*\[\s*(?P<step>\d+)/\s*\d+\](?:.*?\bloss: " + _LOSS + ")?",
            ["Iter(train)"],
            "Iter(train) [ 100/1000]  lr: 1.0000e-04  eta: 0:10:00  time: 0.5  loss: 0.5123",
            "MMEngine iteration-based runners (epoch-based lines count within an epoch and are ignored)",
        ),
        _fmt(
            "composer",
            r"(?<!\])\[batch=(?P<step>\d+)/\d+\]:",
            ["[batch="],
            "[batch=100/1000]:",
            "MosaicML Composer console logger (per-epoch [epoch=E][batch=n/m] lines are ignored)",
        ),
        _fmt(
            "fairseq",
            r"""\bnum_updates(?:=|": ")(?P<step>\d+(?:\.\d+)?(?:e\+\d+)?)\b""",
            ["num_updates"],
            "epoch 001:    100 / 1000 loss=9.87, ppl=935.2, num_updates=100, lr=0.0001",
            "fairseq train_inner lines, plain or JSON; 1e+06 and above are printed to 6 digits",
            _scientific_step,
        ),
        _fmt(
            "lightning",
            # TQDMProgressBar's training bar: desc "Epoch {current_epoch}" (0-based), then tqdm's
            # "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate}{postfix}]",
            # the postfix being ", key=value" per metric. Its other bars are described
            # "Validation", "Sanity Checking", "Testing", "Predicting" (+ " DataLoader i"): not "Epoch ".
            # The loss is the first ", train_loss=" / ", loss=" (or their "_step" forms) of the
            # postfix; "val_loss" and "train_loss_epoch" are not it.
            r"^\s*Epoch (?P<epoch>\d+): +\d+%\|[^|]*\| *(?P<step>\d+)/(?P<total>\d+) \["
            r"(?:.*?, (?:train_)?loss(?:_step)?=" + _LOSS + ")?",
            ["Epoch "],
            "Epoch 2:  45%|████▌     | 45/100 [00:01<00:02, 40.00it/s, v_num=0, train_loss=0.123]",
            "PyTorch Lightning 2.x tqdm bar (its default without rich): `Epoch E: n/total` is E*total + n "
            "(E 0-based), with train_loss; validation, sanity-check, test and predict bars are ignored. It counts "
            "batches: with accumulate_grad_batches=k, Lightning's global_step is 1/k of it",
            _lightning_step,
            live=True,
        ),
        _fmt(
            "keras",
            r"^\s*(?P<step>\d+)/(?P<total>\d+) (?:━|\[[=>.]*\]| - \d)(?:.*? - loss: " + _LOSS + ")?",
            ["━", "ETA:", "/step"],
            " 50/100 ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: 0.1234",
            "Keras progress bar; `Epoch E/T` lines make it a global step: (E-1)*total + n",
            _keras_step,
            ContextRule(r"^Epoch (?P<epoch>\d+)/\d+\s*$", (b"Epoch ",), _keras_epoch),
            live=True,
        ),
    )
}


def _sre_parse():
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore
    return sre_parse


def _required_literal(regex: str, flags: int) -> Optional[bytes]:
    """The longest word (letters, digits, ``_``; at least 3) every match of ``regex`` must
    contain, if any: the bytes the scanner looks for before running the regex.

    Only top-level literal runs count; that is enough for patterns such as
    ``loss=(?P<loss>\\S+) global_step=(\\d+)``. A word, not the whole run: the anchor
    is looked for in the raw output, where a colour code can sit between a word and
    what follows it (``\\x1b[1mStep\\x1b[0m 5`` for ``Step (\\d+)``).
    """
    if flags & re.IGNORECASE:
        return None
    try:
        parsed = _sre_parse().parse(regex, flags)
    except Exception:
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    best, run = "", []
    for op, arg in list(parsed) + [(None, None)]:
        if getattr(op, "name", str(op)) == "LITERAL":
            run.append(chr(arg))
            continue
        for word in re.findall(r"\w+", "".join(run)):
            if len(word) > len(best):
                best = word
        run = []
    try:
        return best.encode("utf-8") if len(best) >= 3 else None
    except UnicodeEncodeError:
        return None


#: Repetition counts RE2 accepts (``{1001}`` and above are refused).
_RE2_MAX_REPEAT = 1000


_REWRITE = "rewrite the pattern without it"


def _re2_unsupported(regex: str) -> Optional[Tuple[str, str]]:
    """The first feature of ``regex`` (valid for ``re``) that RE2 does not have, named for a
    user, and what to do instead."""
    sre_parse = _sre_parse()
    try:
        parsed = sre_parse.parse(regex)
    except Exception:
        return None
    if parsed.state.flags & re.VERBOSE:
        return "verbose mode (?x)", _REWRITE
    if parsed.state.flags & re.ASCII:
        return "the ASCII flag (?a)", "leave it out: RE2's \\d, \\w and \\s are ASCII already"
    try:
        unbounded = sre_parse.MAXREPEAT
    except AttributeError:  # pragma: no cover
        from sre_constants import MAXREPEAT as unbounded  # type: ignore

    def walk(items) -> Optional[Tuple[str, str]]:
        for op, av in items:
            name = getattr(op, "name", str(op))
            if name in ("ASSERT", "ASSERT_NOT"):
                where = "lookahead" if av[0] >= 0 else "lookbehind"
                kind = "a negative " if name == "ASSERT_NOT" else "a "
                syntax = {("lookahead", "ASSERT"): "(?=...)", ("lookahead", "ASSERT_NOT"): "(?!...)",
                          ("lookbehind", "ASSERT"): "(?<=...)", ("lookbehind", "ASSERT_NOT"): "(?<!...)"}
                return f"{kind}{where} {syntax[where, name]}", "match the text around the step instead"
            if name == "GROUPREF":
                return "a backreference (\\1 or (?P=name))", _REWRITE
            if name == "GROUPREF_EXISTS":
                return "a conditional group (?(1)...)", _REWRITE
            if name == "ATOMIC_GROUP":
                return "an atomic group (?>...)", "write a plain group (?:...): RE2 never backtracks anyway"
            if name == "POSSESSIVE_REPEAT":
                return "a possessive quantifier (*+, ++, ?+)", "write a plain one: RE2 never backtracks anyway"
            if name == "AT" and getattr(av, "name", str(av)) == "AT_END_STRING":
                return "\\Z", "write $ instead: a line is matched without its newline"
            if name in ("MAX_REPEAT", "MIN_REPEAT"):
                low, high, sub = av
                if low > _RE2_MAX_REPEAT or (high != unbounded and high > _RE2_MAX_REPEAT):
                    return f"a repetition count above {_RE2_MAX_REPEAT}", _REWRITE
                found = walk(sub)
            elif name == "SUBPATTERN":
                if av[1] & re.VERBOSE:
                    return "verbose mode (?x)", _REWRITE
                found = walk(av[-1])
            elif name == "BRANCH":
                found = next((f for f in map(walk, av[1]) if f), None)
            else:
                found = None
            if found:
                return found
        return None

    return walk(parsed)


class _LinearMatch:
    """What the formats use of ``re.Match``, over the spans RE2 found in the line's UTF-8."""

    __slots__ = ("re", "_data", "_spans")

    def __init__(self, regex: "_LinearRegex", data: bytes, spans):
        self.re, self._data, self._spans = regex, data, spans

    def _span(self, group):
        return self._spans[group if isinstance(group, int) else self.re.groupindex[group]]

    def group(self, group=0) -> Optional[str]:
        start, end = self._span(group)
        return None if start < 0 else self._data[start:end].decode("utf-8", "replace")

    def groupdict(self) -> Dict[str, Optional[str]]:
        return {name: self.group(index) for name, index in self.re.groupindex.items()}

    def start(self, group=0) -> int:  # in characters, as re's
        start = self._span(group)[0]
        return start if start < 0 else len(self._data[:start].decode("utf-8", "replace"))

    def end(self, group=0) -> int:
        end = self._span(group)[1]
        return end if end < 0 else len(self._data[:end].decode("utf-8", "replace"))


class _LinearRegex:
    """A user pattern run by RE2: time linear in the line, whatever the pattern."""

    def __init__(self, pattern: str, compiled, groupindex):
        self.pattern, self._compiled = pattern, compiled
        self.groupindex = dict(groupindex)  # re's (str keys); RE2 numbers the groups the same way
        self.groups = compiled.groups
        self._group_numbers = range(self.groups + 1)

    def search(self, text: str) -> Optional[_LinearMatch]:
        data = text.encode("utf-8", "replace")
        match = self._compiled.search(data)
        if match is None:
            return None
        spans = getattr(match, "_spans", None)  # all of them at once (google-re2 1.1); else one by one
        if spans is None or len(spans) != self.groups + 1:
            spans = [match.span(i) for i in self._group_numbers]
        return _LinearMatch(self, data, spans)

    def __repr__(self) -> str:
        return f"re2({self.pattern!r})"


def _compile_linear(regex: str, groupindex) -> _LinearRegex:
    """``regex`` compiled by RE2, or a PatternError saying what RE2 cannot do."""
    try:
        import re2
    except ImportError:  # pragma: no cover - google-re2 is a dependency
        raise PatternError(f"pattern {regex!r} cannot be used: --pattern is matched with RE2 "
                           f"(pip install google-re2), which is not installed") from None
    options = re2.Options()
    options.log_errors = False  # the reason goes into our PatternError, not onto stderr
    try:
        compiled = re2.compile(regex.encode("utf-8"), options)
    except re2.error as exc:
        why = ("stopstep matches patterns with RE2, whose time is linear in the line, "
               "so that no line can stall the output")
        unsupported = _re2_unsupported(regex)
        if unsupported:
            feature, advice = unsupported
            raise PatternError(f"pattern {regex!r} uses {feature}, which RE2 does not have ({why}); "
                               f"{advice}") from None
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise PatternError(f"pattern {regex!r} cannot be compiled by RE2 ({why}): {detail}") from None
    return _LinearRegex(regex, compiled, groupindex)


def compile_user_pattern(regex: str) -> StepFormat:
    """Turn a ``--pattern`` into a :class:`StepFormat` matched by RE2, or raise PatternError."""
    try:
        regex.encode("utf-8")
    except UnicodeEncodeError:
        raise PatternError(f"pattern {regex!r} is not valid UTF-8") from None
    try:
        with warnings.catch_warnings():  # re's FutureWarning on "[[:digit:]]" and the like
            warnings.simplefilter("ignore")
            compiled = re.compile(regex)
    except re.error as exc:
        raise PatternError(f"pattern {regex!r} does not compile: {exc}") from None
    if "step" in compiled.groupindex:
        to_step = _plain_step
    elif compiled.groups == 1 and compiled.groupindex:
        (name,) = compiled.groupindex
        raise PatternError(
            f"pattern {regex!r} has one group, named {name!r}: the step's group must be named 'step' "
            f"(?P<step>...) or left unnamed; other named groups are values hooks can fetch"
        )
    elif compiled.groups == 1:
        to_step = lambda m, s: step_int(m.group(1))  # noqa: E731
    else:
        named = len(compiled.groupindex)
        raise PatternError(
            f"pattern {regex!r} needs a named group 'step' or exactly one group, "
            f"it has {compiled.groups} ({named} named, none of them 'step')"
        )
    with warnings.catch_warnings():  # the same FutureWarnings from parsing it again
        warnings.simplefilter("ignore")
        literal = _required_literal(regex, compiled.flags)
        linear = _compile_linear(regex, compiled.groupindex)

    def checked(match, state: dict, _convert=to_step) -> Optional[int]:
        try:
            return _convert(match, state)
        except NotAStep:
            raise  # the scanner says so once
        except (TypeError, ValueError):  # the group matched something not an integer
            return None

    fmt = StepFormat(
        name="pattern",
        source=regex,
        anchors=(literal,) if literal else (),
        to_step=checked,
        sample=regex,
        description="--pattern",
    )
    fmt._regex = linear
    return fmt


def resolve_formats(patterns: Sequence[str] = (), presets: Sequence[str] = ()) -> Tuple[StepFormat, ...]:
    """The formats a run matches: user patterns, then presets, else the default set."""
    formats = [compile_user_pattern(p) for p in patterns]
    for name in presets:
        try:
            formats.append(PRESETS[name])
        except KeyError:
            raise PatternError(
                f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}"
            ) from None
    return tuple(formats) or (DEFAULT_FORMAT,)
