"""The status row on a real terminal: stopstep on a pseudo-terminal, its screen
rendered with pyte as a terminal would show it."""

from __future__ import annotations

import platform
import re
import signal
import sys
import textwrap

import psutil
import pytest
from helpers import TIMEOUT, Terminal, run_stopstep, trainer, wait_until

pyte = pytest.importorskip("pyte")

BAR = textwrap.dedent("""
    import sys, time
    total = 100000
    for step in range(1, total):  # a tqdm-like bar redrawn 20 times a second
        sys.stderr.write(f"\\r {step * 100 // total:2d}%|####      | {step}/{total} [00:01<00:02, 20.00it/s]")
        sys.stderr.flush()
        time.sleep(0.05)
""")

FLOOD = textwrap.dedent("""
    import sys, time
    for step in range(1, 10 ** 6):  # 1,000 lines a second
        print(f"step {step} loss 0.5 " + "x" * 40, flush=True)
        time.sleep(0.001)
""")


def bottom_row(term: Terminal) -> str:
    screen = term.screen()
    return screen.display[-1]


def sample_status(term: Terminal, samples: int = 5):
    """The bottom row at several moments while output keeps coming."""
    rows = []
    for _ in range(samples):
        size = len(term.output)
        wait_until(lambda: len(term.output) > size + 2000, "more output")
        rows.append(bottom_row(term))
    return rows


@pytest.mark.parametrize("command,preset", [(BAR, "hf"), (FLOOD, None)], ids=["tqdm-bar-20Hz", "1000-lines-a-second"])
def test_the_status_is_always_on_the_bottom_row(command, preset):
    args = ["run", "--last-step", "10000000"] + (["--preset", preset] if preset else []) + \
        ["--", sys.executable, "-c", command]
    term = Terminal(args)
    try:
        term.wait_for(b"stopstep: step ")
        rows = sample_status(term)
        assert all(row.startswith("stopstep: step ") for row in rows), rows
        screen = term.screen()
        above = "\n".join(screen.display[:-1])
        assert ("|####" in above) if preset else ("loss 0.5" in above)  # the command's output, above it
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()
    screen = term.screen()
    assert screen.margins is None or screen.margins == (0, term.size[0] - 1)  # the whole terminal scrolls again
    assert "stopstep: received SIGINT" in "\n".join(screen.display) or b"received SIGINT" in term.output


_SIGTIMEDWAIT = {"x86_64": "128", "aarch64": "137"}  # rt_sigtimedwait's number


def listening(term: Terminal) -> None:
    """Wait until stopstep's listener is in the command's group: the terminal's signals (a resize)
    reach stopstep from then on (one sent before it joined reached the command alone)."""
    supervisor = psutil.Process(term.proc.pid)

    def joined() -> bool:
        try:
            for child in supervisor.children():
                if "-S" in child.cmdline() and "-c" in child.cmdline():
                    wait_call = _SIGTIMEDWAIT.get(platform.machine())
                    if wait_call is None:
                        return True  # no way to tell here: its being there has to do
                    with open(f"/proc/{child.pid}/syscall") as fh:
                        return fh.read().split()[0] == wait_call  # in rt_sigtimedwait: it hears them now
        except (psutil.Error, OSError):
            pass
        return False

    wait_until(joined, "the terminal listener")


def _whole_again(term: Terminal) -> bool:
    screen = term.screen()
    return screen.margins is None or tuple(screen.margins) == (0, term.size[0] - 1)


def test_the_terminal_is_whole_after_a_crash_and_after_sigterm():
    for ending in ("crash", "sigterm"):
        code = "import time\nfor i in range(1, 30):\n    print('step', i, flush=True)\n    time.sleep(0.05)\n" + \
            ("raise SystemExit(3)\n" if ending == "crash" else "time.sleep(60)\n")
        term = Terminal(["run", "--last-step", "1000", "--", sys.executable, "-c", code])
        try:
            term.wait_for(b"stopstep: step ")
            if ending == "sigterm":
                term.proc.send_signal(signal.SIGTERM)
            assert term.proc.wait(timeout=TIMEOUT) == (3 if ending == "crash" else 143)
        finally:
            term.close()
        assert _whole_again(term), ending
        assert "exit" in term.screen().display[-2] or b"; exit " in term.output  # the summary, in the open


def test_ctrl_z_gives_the_whole_terminal_back_and_fg_takes_the_row_again(pidfile):
    term = Terminal(["run", "--last-step", "100000", "--", *trainer("--rate", "20", "--pidfile", pidfile)])
    try:
        term.wait_for(b"stopstep: step ")
        supervisor = psutil.Process(term.proc.pid)
        term.type(b"\x1a")
        wait_until(lambda: supervisor.status() == psutil.STATUS_STOPPED, "stopstep stopped")
        wait_until(lambda: _whole_again(term), "the whole terminal")  # the shell gets it (read by now)
        regions = term.output.count(b"\x1b[1;23r")
        supervisor.send_signal(signal.SIGCONT)  # fg
        wait_until(lambda: term.output.count(b"\x1b[1;23r") > regions, "the bottom row kept again")
        wait_until(lambda: bottom_row(term).startswith("stopstep: step "), "the status drawn again")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()


SIZE_EACH_STEP = textwrap.dedent("""
    import os, signal, time
    def resized(signum, frame):  # what a program that lays itself out again reads
        size = os.get_terminal_size()
        print(f"resized to {size.lines}x{size.columns}", flush=True)
    signal.signal(signal.SIGWINCH, resized)
    for step in range(1, 10 ** 6):
        size = os.get_terminal_size()  # of its stdout: the pseudo-terminal stopstep gave it
        print(f"step {step} window {size.lines}x{size.columns}", flush=True)
        time.sleep(0.05)
""")


def test_the_status_row_and_the_commands_window_follow_a_resize():
    # Only the terminal's own SIGWINCH: it goes to the foreground group, which is the command's
    # (stdin is the terminal), not to stopstep.
    term = Terminal(["run", "--last-step", "10000000", "--", sys.executable, "-c", SIZE_EACH_STEP])
    try:
        term.wait_for(b"window 24x80")
        listening(term)
        term.resize(30, 100)
        wait_until(lambda: b"\x1b[1;29r" in term.output, "the region set for 30 rows")
        term.wait_for(b"window 30x100")  # the command's pseudo-terminal follows the window
        term.wait_for(b"resized to 30x100")  # and had the new size when it heard of the resize
        wait_until(lambda: bottom_row(term).startswith("stopstep: step "), "the status on the new bottom row")
        term.resize(12, 60)  # smaller: the status must not be left inside the output
        wait_until(lambda: b"\x1b[1;11r" in term.output, "the region set for 12 rows")
        term.wait_for(b"window 12x60")
        wait_until(lambda: bottom_row(term).startswith("stopstep: step "), "the status on the bottom row")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()


FULL_SCREEN_AND_BACK = textwrap.dedent("""
    import sys, time
    def out(text):
        sys.stdout.write(text)
        sys.stdout.flush()
    out("\\x1b[?10")  # a full-screen program's start, its sequence split across two writes
    time.sleep(0.05)
    out("49h\\x1b[2J\\x1b[H")
    for step in range(1, 60):
        out(f"step {step}\\n")
        time.sleep(0.02)
    out("\\x1b[?1049l")  # and back to the main screen
    for step in range(60, 10 ** 6):
        out(f"step {step}\\n")
        time.sleep(0.02)
""")


def test_a_full_screen_command_has_the_whole_screen_until_it_leaves_it():
    term = Terminal(["run", "--last-step", "10000000", "--", sys.executable, "-c", FULL_SCREEN_AND_BACK])
    try:
        term.wait_for(b"\x1b[?1049l")
        term.wait_for(b"step 80\r\n")
        wait_until(lambda: bottom_row(term).startswith("stopstep: step "), "the status row again")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()
    full_screen = term.output[term.output.index(b"49h"):term.output.index(b"\x1b[?1049l")]
    assert b"stopstep: step" not in full_screen and b"\x1b[r" not in full_screen  # its screen, untouched
    assert b"\x1b[1;23r" in term.output[term.output.index(b"\x1b[?1049l"):]  # the row taken again
    assert _whole_again(term)


OWN_SCROLL_REGION = textwrap.dedent("""
    import sys, time
    sys.stdout.write("\\x1b[1;10r\\x1b[2J\\x1b[H")  # a program that keeps rows of its own
    for step in range(1, 10 ** 6):
        print(f"step {step}", flush=True)
        time.sleep(0.02)
""")


def test_a_command_with_its_own_scroll_region_keeps_it():
    term = Terminal(["run", "--last-step", "10000000", "--", sys.executable, "-c", OWN_SCROLL_REGION])
    try:
        term.wait_for(b"step 40\r\n")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()
    after = term.output[term.output.index(b"\x1b[1;10r"):]
    assert b"stopstep: step" not in after and b"\x1b[r" not in after  # its region left alone


IGNORES_SIGINT = textwrap.dedent("""
    import signal, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stops only at step 60, or at SIGKILL
    for step in range(1, 61):
        print(f"step {step}", flush=True)
        time.sleep(0.05)
""")


def test_the_status_goes_on_counting_while_the_command_is_stopping():
    term = Terminal(["run", "--last-step", "10000", "--grace-period", "60", "--", sys.executable, "-c",
                     IGNORES_SIGINT])
    try:
        term.wait_for(b"step 5\r\n")
        term.type(b"\x03")  # a stop begins; the command goes on
        term.wait_for(b"step 50\r\n")
        wait_until(lambda: re.match(r"stopstep: step (\d+)", bottom_row(term)) is not None
                   and int(re.match(r"stopstep: step (\d+)", bottom_row(term)).group(1)) >= 50,
                   "the status at the steps made while stopping")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()


HALF_A_LINE = textwrap.dedent("""
    import sys, time
    print("step 1", flush=True)
    sys.stdout.write("Name: ")
    sys.stdout.flush()
    import os
    while os.get_terminal_size().columns == 80:  # until the window is resized
        time.sleep(0.01)
    print("XYZ", flush=True)
    time.sleep(60)
""")


def test_a_resize_leaves_a_half_written_line_where_it_was():
    term = Terminal(["run", "--last-step", "100", "--", sys.executable, "-c", HALF_A_LINE])
    try:
        term.wait_for(b"Name: ")
        listening(term)
        regions = term.output.count(b"\x1b[1;")
        term.resize(20, 70)
        wait_until(lambda: term.output.count(b"\x1b[1;") > regions, "the region set again")
        term.wait_for(b"XYZ")
        wait_until(lambda: any(row.startswith("Name: XYZ") for row in term.screen().display), "the line whole")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()


HIDES_THE_CURSOR = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # so the grace period's SIGKILL ends it
    sys.stdout.write("\\x1b[?25l\\x1b[41m")  # cursor hidden, a red background, as a UI might
    for step in range(1, 10 ** 6):
        print(f"step {step}", flush=True)
        time.sleep(0.02)
""")


def test_a_command_killed_with_sigkill_leaves_the_cursor_shown_and_colours_off():
    term = Terminal(["run", "--last-step", "10", "--grace-period", "1", "--", sys.executable, "-c",
                     HIDES_THE_CURSOR])
    try:
        assert term.proc.wait(timeout=TIMEOUT) == 137
    finally:
        term.close()
    screen = term.screen()
    assert not screen.cursor.hidden
    summary = next(y for y, row in enumerate(screen.display) if "stopstep: stopped" in row or "reached step" in row)
    assert screen.buffer[summary][0].bg == "default"
