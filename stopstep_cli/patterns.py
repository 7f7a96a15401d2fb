"""Step formats: how a line of output turns into a global step.

A :class:`StepFormat` is data: a regex matched against one cleaned line, the
literal *anchors* that any matching line must contain (so that the output pump
can skip whole reads with a fast ``bytes.find`` before running any regex), and
a small conversion from the match to a global step. The framework presets are
listed once, in :data:`PRESETS`; ``../shared/reference/frameworks.md`` is where
their formats come from.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, Optional, Sequence, Tuple

# ANSI escape sequences (CSI and two-byte ESC forms) and backspaces, removed
# before matching: coloured loggers and Keras' redraws put them mid-line.
ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|\x08")
# torchrun --tee / --role prefixes: "[rank0]:", "[default3]:".
RANK_PREFIX_RE = re.compile(r"^\[[A-Za-z_]*\d+\]:\s?")

Fields = Dict[str, object]


class PatternError(ValueError):
    """A user pattern that cannot be used; the message says why."""


def clean_line(raw: bytes) -> str:
    """Decode one line leniently and strip what hides the step from a regex."""
    text = raw.decode("utf-8", "replace")
    if "\x1b" in text or "\x08" in text:
        text = ANSI_RE.sub("", text)
    if text.startswith("["):
        text = RANK_PREFIX_RE.sub("", text, count=1)
    return text


def _number(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _plain_step(match: re.Match, state: dict) -> Optional[int]:
    return int(match.group("step"))


def _plus_one(match: re.Match, state: dict) -> Optional[int]:
    # The number printed is the step about to run, or read before the update.
    return int(match.group("step")) + 1


def _scientific_step(match: re.Match, state: dict) -> Optional[int]:
    # fairseq prints num_updates >= 1e6 as "1e+06" (6 significant digits).
    value = float(match.group("step"))
    return int(value) if math.isfinite(value) else None


def _locked_total(match: re.Match, state: dict) -> Optional[int]:
    # The training bar comes first; evaluation bars look alike but count
    # something else, so only bars with the first total seen are steps.
    total = int(match.group("total"))
    locked = state.setdefault("total", total)
    return int(match.group("step")) if total == locked else None


def _keras_step(match: re.Match, state: dict) -> Optional[int]:
    epoch = state.get("epoch")
    if epoch is None:
        return None
    return (epoch - 1) * int(match.group("total")) + int(match.group("step"))


def _keras_epoch(match: re.Match, state: dict) -> None:
    state["epoch"] = int(match.group("epoch"))


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
            name: _number(value)
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


_LOSS = r"(?P<loss>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf|NaN|Inf))"

# The default set: the common plain forms and nothing looser. The anchors are
# "tep" and "ter" so that one case-insensitive first letter costs nothing.
DEFAULT_FORMAT = _fmt(
    "default",
    r"(?<![A-Za-z0-9_])(?:global_step|[Ss]tep|[Ii]ter(?:ation)?)"
    r"(?:\s*[:=]\s*|\s+)(?P<step>\d+)(?!\d|\.\d)"
    r"(?:.*?\bloss\s*[:=]?\s*" + _LOSS + r")?",
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
            lambda m, s: int(m.group("step") or m.group("step2")),
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


def _required_literal(regex: str, flags: int) -> Optional[bytes]:
    """The longest literal every match of ``regex`` must contain, if any.

    Only top-level literal runs count; that is enough for patterns such as
    ``loss=(?P<loss>\\S+) global_step=(\\d+)``.
    """
    if flags & re.IGNORECASE:
        return None
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore
    try:
        parsed = sre_parse.parse(regex, flags)
    except Exception:
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    best, run = "", []
    for op, arg in list(parsed) + [(None, None)]:
        if op == sre_parse.LITERAL:
            run.append(chr(arg))
            continue
        text = "".join(run)
        if len(text) > len(best):
            best = text
        run = []
    return best.encode("utf-8") if len(best) >= 3 else None


def compile_user_pattern(regex: str) -> StepFormat:
    """Turn a ``--pattern`` into a :class:`StepFormat`, or raise PatternError."""
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise PatternError(f"pattern {regex!r} does not compile: {exc}") from None
    if "step" in compiled.groupindex:
        to_step = _plain_step
    elif compiled.groups == 1:
        to_step = lambda m, s: int(m.group(1))  # noqa: E731
    else:
        raise PatternError(
            f"pattern {regex!r} needs a named group 'step' or exactly one group, "
            f"it has {compiled.groups} unnamed"
        )
    literal = _required_literal(regex, compiled.flags)

    def checked(match: re.Match, state: dict, _convert=to_step) -> Optional[int]:
        try:
            return _convert(match, state)
        except (TypeError, ValueError):  # the group matched something not an integer
            return None

    return StepFormat(
        name="pattern",
        source=regex,
        anchors=(literal,) if literal else (),
        to_step=checked,
        sample=regex,
        description="--pattern",
    )


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
