"""Command line: parses options and wires them to the library. No logic here
that a Python user could not reach through ``stopstep_cli``."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import click

from . import __version__
from .console import NORMAL, QUIET, VERBOSE, Console
from .errors import EXIT_USAGE, StopstepError, UsageError
from .hooks import StopAtStepHook
from .layouts import LAYOUT_NAMES, make_layout
from .patterns import PRESETS, PatternError, compile_user_pattern, resolve_formats
from .process import parse_signal
from .report import check_report_path, write_report

# Options end at the command's first word, so its own options stay its own.
_RUN_CONTEXT = {"allow_interspersed_args": False}


class _SignalType(click.ParamType):
    name = "SIGNAL"

    def convert(self, value, param, ctx):
        try:
            return parse_signal(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stopstep")
def cli() -> None:
    """Supervise a training command and stop it cleanly at a global step."""


@cli.command(context_settings=_RUN_CONTEXT)
@click.option("--last-step", type=click.IntRange(min=0), envvar="STOPSTEP_LAST_STEP",
              help="Stop once the global step is >= N (absolute). [env: STOPSTEP_LAST_STEP]")
@click.option("--num-steps", type=click.IntRange(min=0), envvar="STOPSTEP_NUM_STEPS",
              help="Stop after N steps from the step the run starts at. [env: STOPSTEP_NUM_STEPS]")
@click.option("--pattern", "patterns", multiple=True, metavar="REGEX",
              help="Regex with a named group 'step' (or one group) matched against each output line. Repeatable.")
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="Built-in log format (see `stopstep presets`). Repeatable.")
@click.option("--log-file", "log_files", multiple=True, metavar="PATH",
              help="Also read steps from a file the command writes, like tail -F. Repeatable.")
@click.option("--log-file-from-start", is_flag=True,
              help="Count what --log-file already holds at launch, not only what is written after.")
@click.option("--checkpoint-dir", "checkpoint_dirs", multiple=True, metavar="DIR",
              help="Also take each finished checkpoint in DIR as a step; the latest at launch is the start step. Repeatable.")
@click.option("--layout", type=click.Choice(("auto",) + LAYOUT_NAMES), default="auto", show_default=True,
              help="How the checkpoints in --checkpoint-dir are named and finished.")
@click.option("--checkpoint-pattern", metavar="REGEX",
              help="Regex with a group 'step' matched against paths relative to --checkpoint-dir (generic layout).")
@click.option("--poll", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Poll files every SECONDS instead of inotify (NFS, Lustre, GCS fuse).")
@click.option("--stop-after-checkpoint", is_flag=True,
              help="At the target, wait (up to --grace-period) for a complete checkpoint at or past it before stopping.")
@click.option("--stop-signal", type=_SignalType(), default="INT", show_default=True,
              help="Signal sent to the command's process group at the target.")
@click.option("--grace-period", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="How long the tree may take to exit before SIGKILL.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Write a JSON summary here (atomically) when stopstep ends.")
@click.option("--require-target", is_flag=True,
              help="Exit 3 if the command exits 0 before reaching the target.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors from stopstep itself.")
@click.option("-v", "--verbose", is_flag=True, help="Also say what stopstep sees and does.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARG...]")
def run(last_step, num_steps, patterns, presets, log_files, log_file_from_start, checkpoint_dirs, layout,
        checkpoint_pattern, poll, stop_after_checkpoint, stop_signal, grace_period, report_path,
        require_target, quiet, verbose, command) -> int:
    """Run COMMAND and stop it once its global step reaches the target.

    \b
    Examples:
      stopstep run --last-step 5000 -- python train.py
      stopstep run --num-steps 50 --preset hf --report run.json -- python train.py
    """
    if (last_step is None) == (num_steps is None):
        raise UsageError("give exactly one of --last-step or --num-steps "
                         "(or STOPSTEP_LAST_STEP / STOPSTEP_NUM_STEPS)")
    if not command:
        raise UsageError("no command given; put it after --, e.g. stopstep run --last-step 100 -- python train.py")
    if quiet and verbose:
        raise UsageError("--quiet and --verbose cannot be used together")
    try:
        formats = resolve_formats(patterns, presets)
    except PatternError as exc:
        raise UsageError(str(exc)) from None
    if report_path:
        check_report_path(report_path)
    sources = _file_sources(formats, log_files, log_file_from_start, checkpoint_dirs, layout,
                            checkpoint_pattern, poll, stop_after_checkpoint)

    from .supervisor import Supervisor  # after validation: a usage error stays cheap

    console = Console(QUIET if quiet else VERBOSE if verbose else NORMAL)
    supervisor = Supervisor(
        command,
        target=StopAtStepHook(num_steps=num_steps, last_step=last_step),
        formats=formats,
        stop_signal=stop_signal,
        grace_period=grace_period,
        require_target=require_target,
        console=console,
        sources=sources,
        stop_after_checkpoint=stop_after_checkpoint,
    )
    report = supervisor.run()
    if report_path:
        try:
            write_report(report_path, report)
        except StopstepError as exc:
            console.error(str(exc))
            if report.exit_code == 0:
                report.exit_code = exc.exit_code
    return report.exit_code


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
    from .sources import CheckpointSource, LogFileSource

    sources = [LogFileSource(path, formats, from_start, poll) for path in log_files]
    sources += [CheckpointSource(d, layout, checkpoint_pattern, poll) for d in checkpoint_dirs]
    return sources


@cli.command()
def presets() -> None:
    """List the built-in log formats with a sample line each."""
    width = max(len(name) for name in PRESETS)
    for name in sorted(PRESETS):
        fmt = PRESETS[name]
        click.echo(f"{name:<{width}}  {fmt.description}")
        click.echo(f"{'':<{width}}  e.g. {fmt.sample.strip()}")


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
    except (OSError, ValueError):
        pass


def entry_point() -> None:
    code = main()
    # Skip interpreter teardown: the tree is down and the report written, and
    # a supervisor's exit should not cost the job milliseconds of GC.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
