"""LineScanner on bytes: every step of a read in order, the last line of a stream, numbers too
long to be steps, and time linear in the line however it arrives (issue 9, item 2).

The scanner is a pure piece (bytes in, observations out), so these are unit tests; the
timing cases run in a child process with a timeout, so that a regression fails instead of
holding the suite (today's code took minutes on some of them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from stopstep_cli.patterns import (
    DEFAULT_FORMAT,
    MAX_STEP_DIGITS,
    PRESETS,
    PatternError,
    compile_user_pattern,
    resolve_formats,
)
from stopstep_cli.scanner import MAX_LINES_INTERLEAVED, LineScanner


def feed_all(scanner, *reads):
    """Feed reads to one scanner; the steps of each read, as lists."""
    out = []
    for data in reads:
        buf = bytearray(data)
        out.append([obs.step for obs in scanner.feed(buf, len(buf))])
    return out


def default_scanner(**kw):
    return LineScanner((DEFAULT_FORMAT,), "t", **kw)


# -- every step of a read counts, in order ------------------------------------------------------


def test_two_ranks_in_one_read_both_count_in_order():
    # the highest (100) is not the last line: it must not be lost behind rank 1's 99
    assert feed_all(default_scanner(), b"[rank0]: step 100\n[rank1]: step 99\n") == [[100, 99]]


def test_interleaved_ranks_in_a_flood_keep_the_highest():
    # 8 ranks, each rank's line a step behind the one before: the highest comes 7 lines from the end
    data = b"".join(b"[rank%d]: step %d\n" % (rank, step - rank) for step in range(1, 2001) for rank in range(8))
    (got,) = feed_all(default_scanner(max_lines=64), data)
    assert max(got) == 2000 and len(got) == MAX_LINES_INTERLEAVED  # they do not rise: a second, longer look
    assert got[-8:] == [2000 - rank for rank in range(8)]  # order kept


@pytest.mark.parametrize("behind", [63, 64, 1000, 4000])
def test_the_highest_step_counts_however_many_lower_lines_follow_it_in_the_read(behind):
    # rank 0 leads; the other ranks' lines for the step before come after it in the same write
    data = b"[rank0]: step 100\n" + b"".join(b"[rank%d]: step 99\n" % (k % 7 + 1) for k in range(behind))
    (got,) = feed_all(default_scanner(), data)
    assert max(got) == 100 and got[0] == 100 and len(got) == behind + 1


def test_the_second_look_reads_context_lines_again_from_where_they_stood():
    keras = (PRESETS["keras"],)
    bar = "{n}/50 ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: 0.5\n"
    # epoch 2's bar at 40, then 70 lines of an older bar (a log replayed): not rising
    data = ("Epoch 2/2\n" + bar.format(n=40) + "".join(bar.format(n=30) for _ in range(70))).encode()
    (got,) = feed_all(LineScanner(keras, "t", max_lines=4), data)
    assert got[0] == 90 and max(got) == 90  # 50 + 40, in epoch 2 as written


def test_a_flooded_read_costs_k_lines_and_counts_the_rest():
    data = b"".join(b"step %d loss 0.5\n" % i for i in range(1, 50_001))
    assert len(data) <= 1 << 20
    scanner = default_scanner(max_lines=64)
    buf = bytearray(data)
    got = scanner.feed(buf, len(buf))
    assert [o.step for o in got] == list(range(50_001 - 64, 50_001))
    skipped = 50_000 - 64
    assert abs(got[0].coalesced - skipped) <= skipped // 50  # estimated, not counted
    assert all(o.coalesced == 0 for o in got[1:])


def test_the_epoch_line_before_the_examined_lines_still_counts():
    keras = (PRESETS["keras"],)
    bar = "{n}/50 ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: 0.5\n"
    data = ("Epoch 1/2\n" + "".join(bar.format(n=n) for n in range(1, 51))
            + "Epoch 2/2\n" + "".join(bar.format(n=n) for n in range(1, 31))).encode()
    (got,) = feed_all(LineScanner(keras, "t", max_lines=4), data)
    assert got == [77, 78, 79, 80]  # epoch 2: 50 + n


def test_crlf_and_cr_lines_with_the_newline_far_away():
    # \r-separated updates whose only \n ends the read: every line is found without
    # searching to that \n from each of them
    data = b"".join(b"\rstep %d |" % i for i in range(1, 30_001)) + b"\n"
    (got,) = feed_all(default_scanner(max_lines=8), data)
    assert got == list(range(29_993, 30_001))


# -- a last line without its newline --------------------------------------------------------------


def test_an_unterminated_last_line_counts_at_end_of_stream():
    scanner = default_scanner()
    assert feed_all(scanner, b"step 99\nstep 100") == [[99]]
    assert [o.step for o in scanner.end_of_stream()] == [100]
    assert scanner.end_of_stream() == []  # once


def test_end_of_stream_with_nothing_carried():
    scanner = default_scanner()
    feed_all(scanner, b"step 5\n")
    assert scanner.end_of_stream() == []


_PRESETS_WITH_CONTEXT = [pytest.param(name, ["Epoch 2/10"] if name == "keras" else [], id=name)
                         for name in sorted(PRESETS)]


@pytest.mark.parametrize("name,before", _PRESETS_WITH_CONTEXT)
def test_every_format_counts_its_unterminated_last_line_once(name, before):
    fmt = PRESETS[name]
    scanner = LineScanner((fmt,), "t")
    data = "".join(line + "\n" for line in before) + fmt.sample
    during = feed_all(scanner, data.encode())[0]
    at_end = [o.step for o in scanner.end_of_stream()]
    # a progress bar is read while drawn; every other format waits for the line's end
    assert len(during + at_end) == 1, (during, at_end)
    assert (during if fmt.live else at_end)


def test_the_last_line_keeps_its_trailing_fields_at_end_of_stream():
    scanner = default_scanner()
    feed_all(scanner, b"step 7 loss na", b"n")
    (obs,) = scanner.end_of_stream()
    assert obs.step == 7 and str(obs.fields["loss"]) == "nan"


# -- numbers too long to be steps -----------------------------------------------------------------


@pytest.mark.parametrize(
    "formats,lines",
    [
        ((DEFAULT_FORMAT,), ["step " + "9" * 5000]),
        ((DEFAULT_FORMAT,), ["step " + "1" * (MAX_STEP_DIGITS + 1)]),
        ((PRESETS["hf"],), [" 10%|█         | " + "9" * 5000 + "/1000 [00:25<03:45,  4.00it/s]"]),
        ((PRESETS["hf"],), [" 10%|█         | 10/" + "9" * 5000 + " [00:25<03:45,  4.00it/s]"]),
        ((PRESETS["tf"],), ["INFO:tensorflow:loss = 0.22, step = " + "9" * 5000 + " (0.812 sec)"]),
        ((PRESETS["fairseq"],), ["epoch 001: loss=9.87, num_updates=" + "9" * 5000 + ", lr=0.0001"]),
        ((PRESETS["fairseq"],), ['{"num_updates": "1e+99"}']),
        ((PRESETS["keras"],), ["Epoch " + "9" * 5000 + "/10", " 50/100 ━━━━ 1s 10ms/step - loss: 0.1"]),
        ((PRESETS["keras"],), ["Epoch 2/10", " 50/" + "9" * 5000 + " ━━━━ 1s 10ms/step - loss: 0.1"]),
        ((PRESETS["megatron"],), [" iteration " + "9" * 5000 + "/    1000 | lm loss: 2.3E+00 |"]),
        ((PRESETS["deepspeed"],), ["[Rank 0] step=" + "9" * 5000 + ", skipped=0, lr=[0.0001]"]),
        ((PRESETS["deepspeed"],), ["steps: " + "9" * 5000 + " loss: 2.3400 iter time (s): 0.5"]),
        ((PRESETS["nanogpt"],), ["iter " + "9" * 5000 + ": loss 2.3456, time 123.45ms"]),
        ((PRESETS["mmengine"],), ["Iter(train) [" + "9" * 5000 + "/1000]  lr: 1.0e-04  loss: 0.5"]),
        ((PRESETS["composer"],), ["[batch=" + "9" * 5000 + "/1000]:"]),
        ((PRESETS["torchtitan"],), ["step: " + "9" * 5000 + "  loss:  7.1234"]),
    ],
)
def test_a_number_too_long_to_be_a_step_is_skipped_with_one_note(formats, lines):
    scanner = LineScanner(formats, "stdout")
    data = "".join(line + "\n" for line in lines).encode()
    assert feed_all(scanner, data, data) == [[], []]  # no ValueError from int(), no step
    assert len(scanner.notes) == 1  # once per scanner, however many lines
    assert "digits" in scanner.notes[0] and scanner.notes[0].startswith("stdout:")


def test_eighteen_digits_and_leading_zeros_are_steps():
    big = "9" * MAX_STEP_DIGITS
    scanner = default_scanner()
    got = feed_all(scanner, ("step %s\nstep %s7\n" % (big, "0" * 5000)).encode())
    assert got == [[int(big), 7]] and scanner.notes == []


def test_a_user_pattern_with_a_huge_number():
    fmt = compile_user_pattern(r"gs=(?P<step>\d+)")
    scanner = LineScanner((fmt,), "t")
    assert feed_all(scanner, b"gs=" + b"9" * 5000 + b"\ngs=5\n") == [[5]]
    assert len(scanner.notes) == 1


# -- time linear in the line, however it arrives --------------------------------------------------

# Each case runs in a child: the formats, the line, and the pieces it arrives in. The child
# feeds the line whole, as an unbuffered print writes it (text, then its newline), in 4 KiB
# pieces and in 4-byte pieces, and prints the slowest time.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from stopstep_cli.patterns import resolve_formats, compile_user_pattern
    from stopstep_cli.scanner import MAX_LINES_INTERLEAVED, LineScanner
    presets, pattern, line = sys.argv[1], sys.argv[2], sys.argv[3].encode().decode("unicode_escape").encode("utf-8")
    formats = tuple(compile_user_pattern(p) for p in [pattern] if p) + (
        resolve_formats(presets=presets.split(",")) if presets else ())
    formats = formats or resolve_formats()
    def pieces(mode):
        if mode == "whole":
            return [line + b"\\n"]
        if mode == "print":
            return [line, b"\\n"]
        size = {"4k": 4096, "4B": 4}[mode]
        return [line[i:i + size] for i in range(0, len(line), size)] + [b"\\n"]
    worst = 0.0
    for mode in ("whole", "print", "4k", "4B"):
        scanner = LineScanner(formats, "t")
        start = time.perf_counter()
        for piece in pieces(mode):
            buf = bytearray(piece)
            scanner.feed(buf, len(buf))
        worst = max(worst, time.perf_counter() - start)
    print(worst)
    """
)

N = 60_000
_ALL = ",".join(sorted(PRESETS))


@pytest.mark.parametrize(
    "presets,pattern,line",
    [
        # the default set's loss after the step: "\\s*[:=]?\\s*" was quadratic (90 s here)
        ("", "", "step 1 loss" + " " * N + "n/a"),
        ("", "", "step 1 loss:" + " " * N + "n/a"),
        ("", "", "step 1 " + "loss " * (N // 5)),
        ("", "", "step " * (N // 5)),
        # tf's loss number: "\\d+\\.?\\d*" was quadratic when ", step = " did not follow
        ("tf", "", "INFO:tensorflow:loss = " + "1" * N + "x, step = 1"),
        # every preset at once on lines made of their anchors, spaces and digits
        (_ALL, "", "step 1 loss" + " " * N + "n/a"),
        (_ALL, "", " iteration 1/ 1 |" + "lm loss: " * (N // 9)),
        (_ALL, "", "Iter(train) [1/1]" + " loss: " * (N // 7)),
        (_ALL, "", "1" * N),
        # a progress bar that never ends, in small pieces: it was read again at every piece
        ("hf", "", " 10%|" + "x" * N),
        ("keras", "", " 1/10 ━" + "━" * (N // 3)),
        # a user pattern that backtracks exponentially in Python's re
        ("", r"(a+)+b(?P<step>\d+)", "a" * N),
        ("", r"(x+x+)+y=(?P<step>\d+)", "y" + "x" * N),
    ],
    ids=["default-loss-spaces", "default-loss-colon-spaces", "default-loss-loss", "default-step-step",
         "tf-digits", "all-loss-spaces", "all-megatron-lm-loss", "all-mmengine-loss", "all-digits",
         "hf-endless-bar", "keras-endless-bar", "user-(a+)+b", "user-(x+x+)+y"],
)
def test_pathological_lines_scan_in_linear_time(presets, pattern, line):
    escaped = line.encode("unicode_escape").decode("ascii")
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, presets, pattern, escaped],
                              capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scanning a {len(line)}-character line took more than 15 s (it hangs)")
    assert done.returncode == 0, done.stderr
    took = float(done.stdout)
    assert took < 1.0, f"the slowest way of feeding the line took {took:.2f} s"


def test_the_catastrophic_user_pattern_still_finds_its_steps():
    # (only short lines in this process: the long ones are timed in a child above)
    fmt = compile_user_pattern(r"(a+)+b(?P<step>\d+)")
    scanner = LineScanner((fmt,), "t")
    assert feed_all(scanner, b"aaaaaaaa\naaab12\n") == [[12]]


# -- user patterns that cannot work ---------------------------------------------------------------


def test_a_lone_named_group_that_is_not_step_is_refused():
    with pytest.raises(PatternError, match=r"named 'loss'.*must be named 'step'"):
        compile_user_pattern(r"(?P<loss>\d+)")
    with pytest.raises(PatternError, match="named 'loss'"):
        resolve_formats([r"loss=(?P<loss>\S+)"])


@pytest.mark.parametrize(
    "regex,feature",
    [
        (r"(?<!val_)step (?P<step>\d+)", "negative lookbehind"),
        (r"step (?P<step>\d+)(?= )", "lookahead"),
        (r"(?P<q>['\"])(?P<step>\d+)(?P=q)", "backreference"),
        (r"step (?P<step>\d+)\Z", r"\\Z"),
        (r"(?x) step \s (?P<step>\d+)", "verbose"),
        (r"step (?P<step>\d{1001})", "repetition count"),
    ],
)
def test_a_pattern_re2_cannot_run_is_refused_naming_the_feature(regex, feature):
    with pytest.raises(PatternError, match=feature):
        compile_user_pattern(regex)


def test_a_user_step_group_that_did_not_take_part_is_no_step():
    fmt = compile_user_pattern(r"gs=(?:(?P<step>\d+)|none)")
    assert feed_all(LineScanner((fmt,), "t"), b"gs=none\ngs=4\n") == [[4]]


def test_user_pattern_values_come_through_re2():
    fmt = compile_user_pattern(r"gs=(?P<step>\d+) loss=(?P<loss>\S+) tag=(?P<tag>\w+)")
    scanner = LineScanner((fmt,), "t")
    buf = bytearray("é gs=12 loss=0.5 tag=warm\n".encode())
    (obs,) = scanner.feed(buf, len(buf))
    assert obs.step == 12 and obs.fields == {"loss": 0.5, "tag": "warm"}
