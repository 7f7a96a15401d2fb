"""Step formats and the scanner: which lines give which step, read by read."""

from __future__ import annotations

import pytest

from stopstep_cli.patterns import (
    DEFAULT_FORMAT,
    PRESETS,
    PatternError,
    compile_user_pattern,
    resolve_formats,
)
from stopstep_cli.scanner import LineScanner


def steps(formats, *reads):
    """Feed reads to one scanner; the steps it reports, read by read."""
    scanner = LineScanner(formats, "test")
    out = []
    for data in reads:
        buf = bytearray(data)
        out.append([obs.step for obs in scanner.feed(buf, len(buf))])
    return out


def one(formats, line):
    got = steps(formats, line.encode() + b"\n")[0]
    return got[-1] if got else None


@pytest.mark.parametrize(
    "line,step",
    [
        ("step 10", 10),
        ("Step 10/100", 10),
        ("step=10", 10),
        ("step: 10", 10),
        ("global_step = 10", 10),
        ("iter 10", 10),
        ("Iteration 10 loss 0.5", 10),
        ("INFO epoch 1 step 12 loss 2.3", 12),
        ("steps: 10", None),
        ("steps_per_second 10", None),
        ("step 1.5", None),
        ("timestep 10", None),
        ("footstep 3", None),
        ("inter 10", None),
        ("lr 0.1 at 10", None),
    ],
)
def test_default_set(line, step):
    assert one((DEFAULT_FORMAT,), line) == step


def test_default_set_reads_loss():
    scanner = LineScanner((DEFAULT_FORMAT,), "t")
    buf = bytearray(b"step 7 | lr 0.1 | loss: 2.5e-1\n")
    (obs,) = scanner.feed(buf, len(buf))
    assert obs.step == 7 and obs.fields == {"loss": 0.25}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_reads_its_own_sample(name):
    fmt = PRESETS[name]
    lines = ["Epoch 2/10"] if name == "keras" else []
    data = "".join(line + "\n" for line in lines + [fmt.sample]).encode()
    got = steps((fmt,), data)[0]
    assert got, f"{name} did not read its sample {fmt.sample!r}"


@pytest.mark.parametrize(
    "preset,lines,expected",
    [
        ("hf", [" 10%|█         | 100/1000 [00:25<03:45,  4.00it/s]"], 100),
        ("tf", ["INFO:tensorflow:loss = 0.22, step = 100 (0.812 sec)"], 101),
        ("deepspeed", ["[Rank 0] step=10, skipped=0, lr=[0.0001]"], 10),
        ("deepspeed", ["steps: 100 loss: 2.3400 iter time (s): 0.5"], 100),
        ("megatron", [" iteration      100/    1000 | consumed samples: 3200 | lm loss: 2.3E+00 |"], 100),
        ("torchtitan", ["\x1b[31mstep: \x1b[39m10  \x1b[32mloss:  7.1234"], 10),
        ("torchtitan", ["[rank0]:[titan] 2025 - INFO - validate step: 10  loss: 7.1"], None),
        ("nanogpt", ["iter 100: loss 2.3456, time 123.45ms, mfu 35.12%"], 101),
        ("nanogpt", ["step 2000: train loss 2.1, val loss 2.2"], None),
        ("mmengine", ["Iter(train) [ 100/1000]  lr: 1.0e-04  loss: 0.5"], 100),
        ("mmengine", ["Epoch(train) [1][100/270]  lr: 1.0e-04  loss: 0.5"], None),
        ("composer", ["[batch=100/1000]:"], 100),
        ("composer", ["[epoch=1][batch=50/100]:"], None),
        ("fairseq", ["epoch 001:    100 / 1000 loss=9.87, num_updates=100, lr=0.0001"], 100),
        ("fairseq", ['{"epoch": 1, "num_updates": "1e+06", "lr": "0.0001"}'], 1000000),
        ("keras", ["Epoch 3/10", " 50/100 ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: 0.1234"], 250),
        ("keras", [" 50/100 ━━━━━━━━━━━━━━━━━━━━ 1s 10ms/step - loss: 0.1234"], None),  # no epoch yet
        ("keras", ["Epoch 2/10", "100/100 [==============================] - 1s 10ms/step - loss: 0.1"], 200),
    ],
)
def test_preset_lines(preset, lines, expected):
    data = "".join(line + "\n" for line in lines).encode()
    got = steps((PRESETS[preset],), data)[0]
    assert (got[-1] if got else None) == expected


def test_hf_locks_onto_the_first_bar_total():
    hf = (PRESETS["hf"],)
    got = steps(
        hf,
        b"Map: 100%|\xe2\x96\x88| 1000/1000 [00:00<00:00, 5000 examples/s]\n",  # datasets bar: has a prefix
        b"\r  1%|          | 10/1000 [00:02<03:45,  4.00it/s]",
        b"\r100%|##########| 8/8 [00:01<00:00,  6.00it/s]\n",  # evaluation bar
        b"\r  2%|          | 20/1000 [00:05<03:45,  4.00it/s]",
    )
    assert got == [[], [10], [], [20]]


def test_keras_epoch_in_the_same_read_as_the_bar():
    keras = (PRESETS["keras"],)
    data = (
        "Epoch 1/3\n"
        "\x1b[1m10/10\x1b[0m \x1b[32m━━━━━━━━━━━━━━━━━━━━\x1b[0m 1s 10ms/step - loss: 0.5\n"
        "Epoch 2/3\n"
        "\b\b\b\r\x1b[1m 4/10\x1b[0m \x1b[32m━━━━━━━━\x1b[0m 1s 10ms/step - loss: 0.4"
        "\b\b\b\r\x1b[1m 5/10\x1b[0m \x1b[32m━━━━━━━━\x1b[0m 1s 10ms/step - loss: 0.4"
    ).encode()
    scanner = LineScanner(keras, "t")
    buf = bytearray(data)
    got = scanner.feed(buf, len(buf))
    # every bar of the read counts, in order, each in the epoch of the Epoch line before it
    assert [o.step for o in got] == [10, 14, 15]
    assert got[1].fields == {"loss": 0.4}
    # the bar still being drawn (5/10) counts at once; its loss, where the bytes end, may be cut off
    obs = got[-1]
    assert obs.fields == {}
    more = bytearray(b"\b\b\b\r")
    assert scanner.feed(more, len(more)) == []  # its redraw does not count it twice
    end = bytearray("\r\x1b[1m10/10\x1b[0m ━━━━ 1s 10ms/step - loss: nan\n".encode())
    (last,) = scanner.feed(end, len(end))  # the epoch's last bar ends its line: its loss is read
    assert last.step == 20 and str(last.fields["loss"]) == "nan"


def test_rank_prefix_and_ansi_are_stripped():
    assert one((DEFAULT_FORMAT,), "[rank0]: step 5") == 5
    assert one((DEFAULT_FORMAT,), "[default3]:\x1b[1mstep\x1b[0m 6") == 6


def test_the_last_lines_of_a_read_count_in_order_and_the_rest_are_coalesced():
    scanner = LineScanner((DEFAULT_FORMAT,), "t", max_lines=64)
    buf = bytearray(b"".join(b"step %d\n" % i for i in range(1, 101)))
    got = scanner.feed(buf, len(buf))
    assert [o.step for o in got] == list(range(37, 101))  # the last 64, in order
    # the 36 lines before them are not read: their number is estimated from the lines that were
    assert abs(got[0].coalesced - 36) <= 2 and sum(o.coalesced for o in got) == got[0].coalesced


def test_lines_split_across_reads():
    assert steps((DEFAULT_FORMAT,), b"noise\nst", b"ep 4", b"2\nmore") == [[], [], [42]]


def test_plain_lines_wait_for_their_end():
    # print() without a buffer writes the text and the newline separately: a line
    # read between the two must not lose its loss (a NaN would go unseen).
    scanner = LineScanner((DEFAULT_FORMAT,), "t")
    got = []
    for data in (b"step 4", b"2 loss na", b"n", b"\n"):
        buf = bytearray(data)
        got.append([(o.step, o.fields) for o in scanner.feed(buf, len(buf))])
    assert got[:3] == [[], [], []]
    assert got[3][0][0] == 42 and str(got[3][0][1]["loss"]) == "nan"


def test_a_progress_bar_is_read_while_it_is_drawn():
    hf = (PRESETS["hf"],)
    bar = "\r{p:3d}%|#         | {n}/1000 [00:01<00:02,  4.00it/s]"
    assert steps(hf, bar.format(p=1, n=10).encode()) == [[10]]
    # a bar cut right after its count may still grow: "10" of "100"
    assert steps(hf, b"\r 10%|#         | 10", b"0/1000 [00:01<00:02,  4.00it/s]") == [[], [100]]


def test_carriage_return_updates_without_a_live_format():
    fmt = (DEFAULT_FORMAT,)
    assert steps(fmt, b"\rstep 1 |", b"\rstep 2 |\rstep 3 |", b"\r") == [[], [1, 2], [3]]


def test_a_huge_line_is_passed_over_without_growing_memory():
    scanner = LineScanner((DEFAULT_FORMAT,), "t", max_line=1024)
    chunk = bytearray(b"x" * 65536)
    for _ in range(100):
        assert scanner.feed(chunk, len(chunk)) == []
    assert len(scanner.carry) == 1024
    tail = bytearray(b"x\nstep 9\n")
    assert [o.step for o in scanner.feed(tail, len(tail))] == [9]


def test_invalid_utf8_and_nul_bytes_do_not_break_matching():
    assert steps((DEFAULT_FORMAT,), b"\xff\xfe\x00 step 3 \xc3\n") == [[3]]


def test_user_pattern_named_or_single_group():
    named = compile_user_pattern(r"gs=(?P<step>\d+) loss=(?P<loss>\S+)")
    assert named.anchors == (b"loss",)  # the longest word outside the groups: colour codes cannot split it
    scanner = LineScanner((named,), "t")
    buf = bytearray(b"gs=12 loss=0.5\n")
    (obs,) = scanner.feed(buf, len(buf))
    assert obs.step == 12 and obs.fields == {"loss": 0.5}
    single = compile_user_pattern(r"(?i)at update (\d+)")
    assert single.anchors == ()  # case-insensitive: no literal to skip by
    assert one((single,), "AT UPDATE 7") == 7


def test_user_pattern_group_that_is_not_a_number_is_ignored():
    fmt = compile_user_pattern(r"phase (?P<step>\w+)")
    assert one((fmt,), "phase warmup") is None
    assert one((fmt,), "phase 12") == 12


@pytest.mark.parametrize(
    "regex,why",
    [("(", "does not compile"), (r"(\d+) (\d+)", "exactly one group"), (r"step \d+", "exactly one group")],
)
def test_bad_user_patterns(regex, why):
    with pytest.raises(PatternError, match=why):
        compile_user_pattern(regex)


def test_resolve_formats():
    assert resolve_formats() == (DEFAULT_FORMAT,)
    assert [f.name for f in resolve_formats([r"x(\d+)"], ["hf"])] == ["pattern", "hf"]
    with pytest.raises(PatternError, match="unknown preset 'nope'"):
        resolve_formats(presets=["nope"])
