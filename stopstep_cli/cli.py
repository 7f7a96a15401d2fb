"""Command line: parses options and wires them to the library. No logic here
that a Python user could not reach through ``stopstep_cli``."""

from __future__ import annotations

import math
import os
import stat
import sys
from typing import Optional, Sequence

import click

from . import __version__
from .channel import CHANNEL_ENV, DISABLE_ENV, TARGET_ENV
from .console import NORMAL, QUIET, VERBOSE, Console
from .errors import StopstepError, UsageError
from .hooks import StopAtStepHook
from .layouts import LAYOUT_NAMES, make_layout
from .outcome import EXIT_STATUSES, EXIT_USAGE
from .patterns import (
    DEFAULT_FORMAT,
    PRESETS,
    PatternError,
    compile_user_pattern,
    resolve_formats,
)
from .progress import Progress, github_step_summary
from .report import check_report_path, write_report
from .signals import parse_stop_signal, release_early
from .standard_hooks import NanLossHook, StallHook, TimeLimitHook
from .terminal import is_terminal

# Options end at the command's first word, so its own options stay its own.
_RUN_CONTEXT = {"allow_interspersed_args": False}


#: The largest step a target can be: a step has at most 18 digits (see scanner.MAX_STEP_DIGITS).
MAX_STEP = 10 ** 18 - 1
DAY, YEAR = 86400.0, 365 * 86400.0


class _Seconds(click.ParamType):
    """A finite number of seconds in a range (NaN and infinity are refused: a NaN
    grace period would never end, an infinite poll would never look)."""

    name = "SECONDS"

    def __init__(self, maximum: float, above_zero: bool = False, minimum: float = 0.0, or_zero: bool = False):
        self.maximum, self.above_zero, self.minimum, self.or_zero = maximum, above_zero, minimum, or_zero

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            seconds = value
        else:
            try:
                seconds = float(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if self.minimum:
            low = f"0 or from {self.minimum:g}" if self.or_zero else f"at least {self.minimum:g}"
        else:
            low = "more than 0" if self.above_zero else "0 or more"
        too_small = seconds < self.minimum and not (self.or_zero and seconds == 0)
        if (not math.isfinite(seconds) or seconds < 0 or (self.above_zero and seconds == 0) or too_small
                or seconds > self.maximum):
            self.fail(f"{value!r} is not a number of seconds {low} and at most {self.maximum:g}", param, ctx)
        return seconds


class _SignalType(click.ParamType):
    name = "SIGNAL"

    def convert(self, value, param, ctx):
        try:
            return parse_stop_signal(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


#: The environment variables stopstep reads, and the ones it sets for the command:
#: (name, who reads it, what it means). ``run --help`` and docs/command-line.md list them.
ENVIRONMENT = (
    ("STOPSTEP_LAST_STEP", "stopstep", "the target when neither --last-step nor --num-steps is given"),
    ("STOPSTEP_NUM_STEPS", "stopstep", "the same for --num-steps (set only one of the two)"),
    ("STOPSTEP_COOPERATIVE", "stopstep", "1/0, true/false: --cooperative / --no-cooperative"),
    ("GITHUB_STEP_SUMMARY", "stopstep", "a file: the run's summary is appended to it as Markdown"),
    ("_STOPSTEP_COMPLETE", "stopstep", "bash_source, zsh_source or fish_source: print shell completion"),
    ("PYTHONPATH", "the command",
     "stopstep puts its in-process side first on it, the rest kept as it was (with --cooperative)"),
    (CHANNEL_ENV, "the command", "set by stopstep: where the command's Python processes report steps"),
    (TARGET_ENV, "the command", "set by stopstep: the absolute target step (empty while not known)"),
    (DISABLE_ENV, "the command", "set it to 1 in a process to keep the in-process side out of it"),
)


# Options that `run` and `scan` share, defined once.
_preset_option = click.option("--preset", "presets", multiple=True, metavar="NAME",
                              help="Built-in log format (see `stopstep presets`). Repeatable.")
_layout_option = click.option("--layout", type=click.Choice(("auto",) + LAYOUT_NAMES), default="auto",
                              show_default=True, metavar="NAME",
                              help="How the checkpoints in --checkpoint-dir are named and finished: "
                                   "auto or one of `stopstep layouts`.")
_checkpoint_pattern_option = click.option(
    "--checkpoint-pattern", metavar="REGEX",
    help="Regex with a group 'step' matched against paths relative to --checkpoint-dir (generic layout).")


class _RunCommand(click.Command):
    """``run``, whose help ends with its exit statuses and environment variables
    (wrapped to the terminal as the options are)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Exit status"):
            formatter.write_dl([(row.status, row.brief) for row in EXIT_STATUSES])
        with formatter.section("Environment"):
            formatter.write_dl([(name, what) for name, _who, what in ENVIRONMENT])
        formatter.write_paragraph()
        formatter.write_text("The reference: docs/command-line.md and docs/exit-status.md in stopstep's source.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, prog_name="stopstep")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Supervise a training command and stop it cleanly at a global step.

    \b
    Start with:
      stopstep run --last-step 5000 -- python train.py
      stopstep run --help
    """
    if ctx.invoked_subcommand != "run":  # nothing to pass signals on to: Ctrl-C ends it at once
        release_early()
    if ctx.invoked_subcommand is None:  # bare `stopstep`: the help, and a success
        click.echo(ctx.get_help())


@cli.command(cls=_RunCommand, context_settings=_RUN_CONTEXT)
@click.option("--last-step", type=click.IntRange(0, MAX_STEP), metavar="N",
              help="Stop once the global step is >= N (absolute). [env: STOPSTEP_LAST_STEP]")
@click.option("--num-steps", type=click.IntRange(0, MAX_STEP), metavar="N",
              help="Stop after N steps from the step the run starts at. [env: STOPSTEP_NUM_STEPS]")
@click.option("--pattern", "patterns", multiple=True, metavar="REGEX",
              help="Regex with a named group 'step' (or one group) matched against each output line. Repeatable.")
@_preset_option
@click.option("--log-file", "log_files", multiple=True, metavar="PATH",
              help="Also read steps from a file the command writes, like tail -F. Repeatable.")
@click.option("--log-file-from-start", is_flag=True,
              help="Count what --log-file already holds at launch, not only what is written after.")
@click.option("--checkpoint-dir", "checkpoint_dirs", multiple=True, metavar="DIR",
              help="Also take each finished checkpoint in DIR as a step; the latest at launch is the start step. Repeatable.")
@_layout_option
@_checkpoint_pattern_option
@click.option("--poll", type=_Seconds(3600, minimum=0.01), metavar="SECONDS",
              help="Poll files every SECONDS instead of inotify (NFS, Lustre, GCS fuse).")
@click.option("--stop-after-checkpoint", is_flag=True,
              help="At the target, wait (up to --grace-period) for a complete checkpoint at or past it before stopping.")
@click.option("--stop-signal", type=_SignalType(), default="INT", show_default=True,
              help="Signal sent to the command's process group at the target.")
@click.option("--grace-period", type=_Seconds(DAY), default=30.0, show_default=True, metavar="SECONDS",
              help="How long the tree may take to exit before SIGKILL.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Write a JSON summary here (atomically) when stopstep ends.")
@click.option("--require-target", is_flag=True,
              help="Exit 3 if the command exits 0 before reaching the target.")
@click.option("--max-restarts", type=click.IntRange(0, 10000), default=0, show_default=True, metavar="N",
              help="Start the command again when it exits non-zero before the target.")
@click.option("--restart-delay", type=_Seconds(DAY), default=0.0, show_default=True, metavar="SECONDS",
              help="Wait this long before each restart.")
@click.option("--stall-timeout", type=_Seconds(YEAR, above_zero=True), metavar="SECONDS",
              help="Stop (exit 124) when no new step comes for this long.")
@click.option("--first-step-timeout", type=_Seconds(YEAR, above_zero=True), metavar="SECONDS",
              help="How long the first step of each process may take (default: --stall-timeout).")
@click.option("--time-limit", type=_Seconds(YEAR, above_zero=True), metavar="SECONDS",
              help="Stop (exit 124) after this much wall-clock time.")
@click.option("--stop-on-nan", is_flag=True, help="Stop (exit 4) when the loss is NaN or infinite.")
@click.option("--nan-field", default="loss", show_default=True, metavar="NAME",
              help="The pattern's named group --stop-on-nan reads.")
@click.option("--hook", "hook_specs", multiple=True, metavar="MODULE:CLASS",
              help="A SessionRunHook of yours: module:Class or path/to/file.py:Class. Repeatable.")
@click.option("--hook-arg", "hook_args", multiple=True, metavar="KEY=VALUE",
              help="A constructor argument for the --hook classes that take it. Repeatable.")
@click.option("--hook-timeout", type=_Seconds(DAY, minimum=0.01), default=60.0, show_default=True,
              metavar="SECONDS", help="A hook call that has not returned after this long is a failed hook (exit 5).")
@click.option("--cooperative/--no-cooperative", default=True, show_default=True, envvar="STOPSTEP_COOPERATIVE",
              help="Let the command's Python processes stop themselves at the target (Transformers, Lightning, "
                   "Keras, or stopstep_cli.beacon) before any signal. [env: STOPSTEP_COOPERATIVE]")
@click.option("--subreaper/--no-subreaper", default=True, show_default=True,
              help="Adopt and reap orphaned descendants (always on as PID 1).")
@click.option("--tty", type=click.Choice(("auto", "always", "never")), default="auto", show_default=True,
              help="Run the command's output on a pseudo-terminal (auto: where stopstep's own is a terminal).")
@click.option("--progress", type=click.Choice(("auto", "always", "never")), default="auto", show_default=True,
              help="Status line on stderr (auto: when stderr is a terminal; else a line every --status-interval).")
@click.option("--status-interval", type=_Seconds(DAY, minimum=0.1, or_zero=True), default=60.0, show_default=True,
              metavar="SECONDS",
              help="Without a terminal, print progress this often (0: never).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors from stopstep itself.")
@click.option("-v", "--verbose", is_flag=True, help="Also say what stopstep sees and does.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARG...]")
def run(**opts) -> int:
    """Run COMMAND and stop it once its global step reaches the target.

    \b
    Examples:
      stopstep run --last-step 5000 -- python train.py
      stopstep run --num-steps 50 --preset hf --report run.json -- python train.py
    """
    _target_from_environment(opts)
    if not opts["command"]:
        raise UsageError("no command given; put it after --, e.g. stopstep run --last-step 100 -- python train.py")
    if opts["quiet"] and opts["verbose"]:
        raise UsageError("--quiet and --verbose cannot be used together")
    try:
        formats = resolve_formats(opts["patterns"], opts["presets"])
    except PatternError as exc:
        raise UsageError(str(exc)) from None
    if opts["report_path"] is not None:
        check_report_path(opts["report_path"])
    _check_nan_field(opts, formats)
    sources = _file_sources(formats, opts["log_files"], opts["log_file_from_start"], opts["checkpoint_dirs"],
                            opts["layout"], opts["checkpoint_pattern"], opts["poll"], opts["stop_after_checkpoint"])
    hooks = _hooks(opts)

    from .supervisor import Supervisor  # after validation: a usage error stays cheap

    console = Console(QUIET if opts["quiet"] else VERBOSE if opts["verbose"] else NORMAL)
    supervisor = Supervisor(
        opts["command"],
        target=StopAtStepHook(num_steps=opts["num_steps"], last_step=opts["last_step"]),
        hooks=hooks,
        formats=formats,
        stop_signal=opts["stop_signal"],
        grace_period=opts["grace_period"],
        require_target=opts["require_target"],
        console=console,
        sources=sources,
        stop_after_checkpoint=opts["stop_after_checkpoint"],
        max_restarts=opts["max_restarts"],
        restart_delay=opts["restart_delay"],
        subreaper=opts["subreaper"],  # on by default from the command line
        tty=opts["tty"],
        foreground=True,
        progress=_progress(opts),
        hook_timeout=opts["hook_timeout"],
        guardian=True,
        cooperative=opts["cooperative"],
        on_report=lambda report: _publish(report, opts["report_path"], console),
        # a hook will not come back; the tree is down and the report written: end here
        on_abandon=lambda report: _exit_now(report.exit_code, console),
    )
    return supervisor.run().exit_code


def _publish(report, path: Optional[str], console: Console) -> None:
    """The report file and the GitHub job summary (inside the run, so that a reader
    that never reads cannot hold the end up)."""
    if path:
        try:
            write_report(path, report)
        except StopstepError as exc:
            console.error(str(exc))
            if report.exit_code == 0:
                report.exit_code = exc.exit_code
    github_step_summary(report)


#: Values the in-process side reports with its steps, whatever the log says: every framework's
#: loss, and Hugging Face's grad_norm (its logged loss hides a NaN by default).
INPROCESS_VALUES = ("loss", "grad_norm")


def _check_nan_field(opts, formats) -> None:
    """--nan-field must name a value some format in use reads (or the loss the in-process
    side reports), and means nothing without --stop-on-nan."""
    field = opts["nan_field"]
    if not opts["stop_on_nan"]:
        source = click.get_current_context().get_parameter_source("nan_field")
        if source is not click.core.ParameterSource.DEFAULT:
            raise UsageError("--nan-field needs --stop-on-nan")
        return
    values = {name for fmt in formats for name in fmt.regex.groupindex
              if not name.startswith("step") and name != "total"}
    if field in values or (field in INPROCESS_VALUES and opts["cooperative"]):
        return
    names = ", ".join(fmt.name for fmt in formats)
    raise UsageError(f"--stop-on-nan reads the value {field!r}, which none of the formats in use reads ({names})"
                     + ("" if opts["cooperative"] else " and the in-process side is off")
                     + "; name another with --nan-field, or give a --pattern with (?P<" + field + ">...)")


def _target_from_environment(opts) -> None:
    """Exactly one target. A target on the command line wins over both environment
    variables (an image sets STOPSTEP_LAST_STEP; a run of it asks for --num-steps), which
    are read, and checked, only when the command line gives none."""
    if opts["last_step"] is not None and opts["num_steps"] is not None:
        raise UsageError("give exactly one of --last-step or --num-steps")
    if opts["last_step"] is not None or opts["num_steps"] is not None:
        return
    given = {name: os.environ[var] for name, var in (("last_step", "STOPSTEP_LAST_STEP"),
                                                     ("num_steps", "STOPSTEP_NUM_STEPS")) if os.environ.get(var)}
    if len(given) != 1:
        raise UsageError("give exactly one of --last-step or --num-steps "
                         "(or STOPSTEP_LAST_STEP / STOPSTEP_NUM_STEPS)")
    (name, text), = given.items()
    var = "STOPSTEP_" + name.upper()
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(f"{var}={text!r} is not a step (a whole number from 0 to {MAX_STEP})") from None
    if not 0 <= value <= MAX_STEP:
        raise UsageError(f"{var}={text!r} is not a step (a whole number from 0 to {MAX_STEP})")
    opts[name] = value


def _hooks(opts) -> list:
    """The built-in hooks the options ask for, then the user's, in that order."""
    hooks = []
    if opts["stall_timeout"] or opts["first_step_timeout"]:
        hooks.append(StallHook(opts["stall_timeout"], opts["first_step_timeout"]))
    if opts["time_limit"]:
        hooks.append(TimeLimitHook(opts["time_limit"]))
    if opts["stop_on_nan"]:
        hooks.append(NanLossHook(opts["nan_field"]))
    if opts["hook_args"] and not opts["hook_specs"]:
        raise UsageError("--hook-arg needs --hook")
    if opts["hook_specs"]:
        from .user_hooks import (  # inspect: only when needed
            HookLoadError,
            load_hooks,
            parse_hook_args,
        )

        try:
            hooks += load_hooks(opts["hook_specs"], parse_hook_args(opts["hook_args"]))
        except HookLoadError as exc:
            raise UsageError(str(exc)) from None
    return hooks


def _progress(opts):
    mode = opts["progress"]
    if opts["quiet"] or mode == "never":
        return None
    status_line = mode == "always" or (mode == "auto" and is_terminal(2))
    if not status_line and not opts["status_interval"]:
        return None
    return Progress(status_line, opts["status_interval"])


def _file_sources(formats, log_files, from_start, checkpoint_dirs, layout, checkpoint_pattern, poll,
                  stop_after_checkpoint) -> list:
    """The --log-file and --checkpoint-dir sources, after checking the options fit together."""
    if not checkpoint_dirs:
        for given, option in ((layout != "auto", "--layout"), (checkpoint_pattern, "--checkpoint-pattern"),
                              (stop_after_checkpoint, "--stop-after-checkpoint")):
            if given:
                raise UsageError(f"{option} needs --checkpoint-dir")
    if from_start and not log_files:
        raise UsageError("--log-file-from-start needs --log-file")
    if poll and not (log_files or checkpoint_dirs):
        raise UsageError("--poll needs --log-file or --checkpoint-dir")
    if checkpoint_pattern is not None:
        if layout not in ("auto", "generic"):
            raise UsageError(f"--checkpoint-pattern is for the generic layout, not --layout {layout}")
        try:
            compile_user_pattern(checkpoint_pattern)
        except PatternError as exc:
            raise UsageError(str(exc).replace("pattern", "--checkpoint-pattern", 1)) from None
    for option, paths in (("--checkpoint-dir", checkpoint_dirs), ("--log-file", log_files)):
        if any(not path for path in paths):
            raise UsageError(f"{option} needs a path (it was empty)")
        for path in paths:
            if path.startswith("-") and not os.path.lexists(path):  # `--log-file -- cmd` forgot the path
                raise UsageError(f"{option} {path!r} looks like an option; give the path "
                                 f"(./{path} if that is really its name)")
    for path in checkpoint_dirs:
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--checkpoint-dir {path} is not a directory")
    for path in log_files:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # not there yet: it will be watched for
        if stat.S_ISDIR(mode):
            raise UsageError(f"--log-file {path} is a directory")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise UsageError(f"--log-file {path} is not a regular file or a FIFO")
    from .sources import CheckpointSource, LogFileSource

    sources = [LogFileSource(path, formats, from_start, poll) for path in log_files]
    sources += [CheckpointSource(d, layout, checkpoint_pattern, poll) for d in checkpoint_dirs]
    return sources


@cli.command(short_help="List the log formats (the default set, the presets) with a sample line each.")
def presets() -> None:
    """List the built-in log formats with a sample line each: the default set (what
    runs without --pattern and --preset), then the presets (--preset NAME)."""
    width = max(len(name) for name in PRESETS)
    lines = ["default set, used when neither --pattern nor --preset is given:",
             f"{'':<{width}}  {DEFAULT_FORMAT.description}, with a loss after the step",
             f"{'':<{width}}  e.g. {DEFAULT_FORMAT.sample.strip()}",
             "", "presets (--preset NAME, repeatable):"]
    for name in sorted(PRESETS):
        fmt = PRESETS[name]
        lines.append(f"{name:<{width}}  {fmt.description}")
        lines.append(f"{'':<{width}}  e.g. {fmt.sample.strip()}")
    _print(lines)


@cli.command(short_help="Show what run would read from saved logs and checkpoint directories.")
@click.argument("files", nargs=-1, metavar="[FILE... | -]")
@click.option("--pattern", "patterns", multiple=True, metavar="REGEX",
              help="Regex with a named group 'step' (or one group), as for run. Repeatable.")
@_preset_option
@click.option("--checkpoint-dir", "checkpoint_dirs", multiple=True, metavar="DIR",
              help="List the checkpoints in DIR, complete or not and why. Repeatable.")
@_layout_option
@_checkpoint_pattern_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (fields above).")
def scan(files, patterns, presets, checkpoint_dirs, layout, checkpoint_pattern, as_json) -> int:
    """Read saved logs (or stdin) and checkpoint directories the way `stopstep run` would.

    \b
    For each FILE (- or none: stdin) and each format (--pattern, --preset; none:
    the default set), with the scanner `run` uses:
      - how many lines gave a step, the first, last and highest step, with their
        line numbers (lines end at \\n or \\r, as in run; numbers count \\n);
      - lines the format matched but that gave no step, and why (an evaluation
        bar of another total, a Keras bar before any `Epoch E/T` line, ...);
      - lines that looked like a step but matched no format: lines holding a word
        beginning with step, iter or epoch, num_updates, a count n/total or a
        tqdm bar's %|; the first line of the most frequent kinds is shown,
        with its line number and the presets that would read it.
    Each --checkpoint-dir: every checkpoint in it with its step, complete or not
    and why, by its layout (--layout auto says which it detected).

    \b
    --json prints one object:
      found            a step was found (exit status 0)
      step             the highest step in the logs and complete checkpoints, or null
      formats          [{name, option}] the formats used ([] when no log is read)
      logs             [{path ("-": stdin), lines, step (highest or null),
                         formats: [{name, option, lines, first, last, highest,
                                    context_lines, passed_over: {count, kinds:
                                    [{why, count, line, text}]}}],
                         unmatched: {count, kinds: [{count, line, text, presets}]}}]
                       first/last/highest: {step, line, text} or null; a kind's
                       line and text are its first line's; presets: the presets
                       not in use whose regex matches that line
      checkpoint_dirs  [{path, layout (null: none recognised), detected, entries,
                         step (latest complete, or null),
                         checkpoints: [{name, path, step, complete, why}],
                         ignored: [{name, why}]}]

    \b
    Exit status: 0 a step was found (a line, or a complete checkpoint), 1 none,
    2 usage error (an unreadable FILE, a bad regex, a missing directory, ...).

    \b
    Examples:
      stopstep scan train.log --preset hf
      python train.py 2>&1 | tee run.log | stopstep scan --preset lightning
      stopstep scan --checkpoint-dir out
      stopstep scan run.log --checkpoint-dir out --json
    """
    from . import scan as scanning

    try:
        formats = resolve_formats(patterns, presets)
    except PatternError as exc:
        raise UsageError(str(exc)) from None
    if not checkpoint_dirs:
        for given, option in ((layout != "auto", "--layout"), (checkpoint_pattern, "--checkpoint-pattern")):
            if given:
                raise UsageError(f"{option} needs --checkpoint-dir")
    if checkpoint_pattern is not None:
        if layout not in ("auto", "generic"):
            raise UsageError(f"--checkpoint-pattern is for the generic layout, not --layout {layout}")
        try:
            compile_user_pattern(checkpoint_pattern)
        except PatternError as exc:
            raise UsageError(str(exc).replace("pattern", "--checkpoint-pattern", 1)) from None
    if list(files).count("-") > 1:
        raise UsageError("- (stdin) given more than once")
    if not files and not checkpoint_dirs:
        if is_terminal(0):
            raise UsageError("give a FILE, - for stdin, or --checkpoint-dir DIR (stdin is a terminal)")
        files = ("-",)
    for path in files:  # every usage error before any output
        if path != "-":
            scanning.check_log_path(path)
    for path in checkpoint_dirs:
        scanning.check_checkpoint_dir(path)
    surveys = [scanning.survey_checkpoints(path, layout, checkpoint_pattern) for path in checkpoint_dirs]
    logs = [scanning.scan_log(path, formats) for path in files]
    result = scanning.ScanResult(formats, logs, surveys)
    if as_json:
        import json

        _print([json.dumps(result.to_dict(), indent=2, ensure_ascii=False)])
    else:
        _print(result.render())
    return 0 if result.found else 1


def _print(lines) -> None:
    """Lines to stdout; a reader that stopped reading (| head) ends it quietly."""
    try:
        for line in lines:
            click.echo(line)
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # nothing more can reach it: stop the flush at exit from complaining
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass


@cli.command()
def layouts() -> None:
    """List the checkpoint layouts and when each counts a checkpoint as finished."""
    width = max(len(name) for name in LAYOUT_NAMES)
    for name in LAYOUT_NAMES:
        layout = make_layout(name)
        click.echo(f"{name:<{width}}  {layout.description}")
        if layout.counts != "steps":
            click.echo(f"{'':<{width}}  the number counts {layout.counts}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: every failure becomes one line on stderr and an exit status."""
    try:
        code = cli.main(args=argv, prog_name="stopstep", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        return EXIT_USAGE
    except click.UsageError as exc:
        hint = f" (see 'stopstep {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
        _error(f"{exc.format_message()}{hint}")
        return EXIT_USAGE
    except click.Abort:
        return 130
    except StopstepError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


def _error(text: str) -> None:
    try:
        sys.stderr.write(f"stopstep: error: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def entry_point() -> None:
    _exit_now(main())


def _exit_now(code: int, console: Optional[Console] = None) -> None:
    # Skip interpreter teardown: the tree is down and the report written, and
    # a supervisor's exit should not cost the job milliseconds of GC. Nothing is
    # flushed to a stream whose reader stopped reading (it would block for good).
    if console is None or not console.gone:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):  # AttributeError: started without that fd
                pass
    os._exit(code)
