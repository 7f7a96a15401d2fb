"""The `lightning` preset: PyTorch Lightning 2.x's tqdm bar (TQDMProgressBar, its default without
rich) read as a global step, E*total + n, its validation, sanity-check, test and predict bars
ignored (issue 11, item 4).

The lines below are tqdm's output for Lightning's descriptions and postfix (`Epoch {current_epoch}`,
`v_num=0, train_loss=0.123`), captured on a pipe: `\\r` before each redraw, the validation bar at
position 1 ended by a cursor-up `\\x1b[A`, and Lightning's padding of floats (`0.500`, `nan.0`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from stopstep_cli.patterns import MAX_STEP_DIGITS, PRESETS, resolve_formats
from stopstep_cli.scanner import LineScanner

LIGHTNING = PRESETS["lightning"]
BAR = "Epoch {e}:  {p:>3}%|████▌     | {n}/{t} [00:01<00:02, 40.00it/s{post}]"


def bar(e, n, t=100, post=", v_num=0, train_loss=0.123"):
    return BAR.format(e=e, n=n, t=t, p=n * 100 // t, post=post)


def observations(*reads, formats=(LIGHTNING,)):
    """Feed reads to one scanner; (step, fields) of each read, and of the end of the stream."""
    scanner = LineScanner(formats, "stdout")
    out = []
    for data in reads:
        buf = bytearray(data.encode() if isinstance(data, str) else data)
        out.append([(o.step, o.fields) for o in scanner.feed(buf, len(buf))])
    out.append([(o.step, o.fields) for o in scanner.end_of_stream()])
    return out


def steps_of(text):
    return [step for read in observations(text) for step, _ in read]


def test_the_sample_reads_as_epoch_times_total_plus_n():
    assert LIGHTNING.live and "batches" in LIGHTNING.description and "accumulate_grad_batches" in LIGHTNING.description
    assert steps_of(LIGHTNING.sample + "\n") == [2 * 100 + 45]


@pytest.mark.parametrize(
    "line,step",
    [
        (bar(0, 0), 0),  # the bar as drawn at the start of the first epoch
        (bar(0, 45), 45),
        (bar(0, 100), 100),
        (bar(1, 0), 100),  # the next epoch starts where the last ended
        (bar(3, 7, t=250), 757),
        ("Epoch 12: 100%|##########| 1000/1000 [10:00<00:00, 1.67it/s, v_num=3]", 13000),  # ascii bar
        ("[rank0]:Epoch 1:  50%|█████     | 5/10 [00:01<00:01, 5.00it/s]", 15),  # torchrun prefix
        ("\x1b[A\x1b[2KEpoch 1:  50%|█████     | 5/10 [00:01<00:01, 5.00it/s]", 15),  # cursor moves
        ("Epoch 0: 45it [00:01, 40.00it/s, v_num=0]", None),  # no total (an iterable dataset): no step
        ("Validation:   0%|          | 0/8 [00:00<?, ?it/s]\x1b[A", None),
        ("Validation DataLoader 0:  50%|█████     | 4/8 [00:00<00:00, 11374.38it/s]\x1b[A", None),
        ("Sanity Checking: |          | 0/? [00:00<?, ?it/s]", None),
        ("Sanity Checking DataLoader 0:  50%|█████     | 1/2 [00:00<00:00, 9.00it/s]", None),
        ("Testing DataLoader 0: 100%|██████████| 8/8 [00:00<00:00, 90.00it/s]", None),
        ("Predicting DataLoader 0: 100%|██████████| 8/8 [00:00<00:00, 90.00it/s]", None),
        ("Epoch 3/10", None),  # Keras' epoch line
        (" 45%|████▌     | 45/100 [00:01<00:02, 40.00it/s]", None),  # HF Trainer's bar: no description
        ("Epoch 0, global step 100: 'val_loss' reached 0.50000 (best 0.50000)", None),  # ModelCheckpoint
    ],
)
def test_lines(line, step):
    got = steps_of(line + "\n")
    assert (got[-1] if got else None) == step


@pytest.mark.parametrize(
    "post,loss",
    [
        (", v_num=0, train_loss=0.123", 0.123),
        (", v_num=0, loss=2.500", 2.5),
        (", v_num=0, train_loss_step=0.700, train_loss_epoch=0.900", 0.7),
        (", v_num=0, train_loss=1.23e+3", 1230.0),
        (", v_num=0, train_loss=nan.0", "nan"),  # Lightning pads a NaN to "nan.0"
        (", v_num=0, train_loss=-inf.0", "-inf"),
        (", v_num=0, val_loss=0.300", None),  # not the training loss
        (", v_num=0, train_loss_epoch=0.900", None),  # last epoch's mean
        (", v_num=0, val_loss=0.300, train_loss=0.500", 0.5),
        ("", None),
    ],
)
def test_the_training_loss_is_read_from_the_postfix(post, loss):
    ((step, fields),) = [obs for read in observations(bar(1, 20, post=post) + "\n") for obs in read]
    assert step == 120 and fields.get("epoch") == 1.0
    got = fields.get("loss")
    if isinstance(loss, str):
        assert isinstance(got, float) and math.isinf(got) == ("inf" in loss) and (got < 0) == loss.startswith("-")
        assert math.isnan(got) == (loss == "nan")
    else:
        assert got == loss


def test_a_piped_run_with_validation_and_sanity_check_counts_only_training_batches():
    # What Lightning writes to a pipe for 2 epochs of 10 batches with a validation run after each
    # (8 batches, position 1) and the sanity check (2 batches) before the first.
    out = ["Sanity Checking: |          | 0/? [00:00<?, ?it/s]",
           "Sanity Checking DataLoader 0: 100%|██████████| 2/2 [00:00<00:00, 9.00it/s]\x1b[A"]
    chunks = ["\n".join("\r" + line for line in out)]
    for epoch in range(2):
        chunks.append("".join("\r" + bar(epoch, n, t=10) for n in range(11)))
        chunks.append("\n" + "".join(f"\rValidation DataLoader 0: {v * 100 // 8:>3}%|█    | {v}/8 "
                                     f"[00:00<00:00, 90.00it/s]\x1b[A" for v in range(9)))
        chunks.append("\r" + " " * 60 + "\x1b[A")
        chunks.append("\r" + bar(epoch, 10, t=10, post=", v_num=0, train_loss=0.500, val_loss=0.300"))
    chunks.append("\n")
    got = [step for read in observations(*chunks) for step, _ in read]
    # every training bar counts while it is drawn, never a validation or sanity-check count: the steps
    # only go up (a bar redrawn after validation, or the next epoch's 0/10, gives the same step again,
    # which the supervisor does not run through the hooks twice)
    assert got == sorted(got) and sorted(set(got)) == list(range(0, 21))


def test_the_bar_being_drawn_counts_at_once_but_not_a_count_cut_short():
    # "4" of "45/100" may still grow: it waits; once the bar is drawn past its count it counts
    got = observations("\rEpoch 0:  45%|████▌     | 4", "5/100 [00:01<00:02, 40.00it/s, v_num=0, train_loss=0.1")
    assert got[0] == []
    assert [step for step, _ in got[1]] == [45] and "loss" not in got[1][0][1]  # the loss may be cut short
    assert got[2] == []  # the end of the stream does not count it again


def test_an_epoch_times_total_too_big_to_be_a_step_is_skipped_with_a_note():
    scanner = LineScanner((LIGHTNING,), "stdout")
    huge = "9" * (MAX_STEP_DIGITS - 1)
    buf = bytearray((bar(huge, 5, t=1000) + "\n" + bar(1, 5) + "\n").encode())
    assert [o.step for o in scanner.feed(buf, len(buf))] == [105]
    assert len(scanner.notes) == 1 and "digits" in scanner.notes[0]


def test_it_combines_with_other_formats():
    formats = resolve_formats(presets=["hf", "lightning"])
    assert [f.name for f in formats] == ["hf", "lightning"]
    got = observations(" 10%|█         | 100/1000 [00:25<03:45,  4.00it/s]\n" + bar(2, 45) + "\n", formats=formats)
    assert [step for step, _ in got[0]] == [100, 245]


# -- time linear in the line, however it arrives ------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from stopstep_cli.patterns import resolve_formats
    from stopstep_cli.scanner import LineScanner
    presets, line = sys.argv[1], sys.stdin.buffer.read()
    formats = resolve_formats(presets=presets.split(","))
    worst = 0.0
    for size in (None, 4096, 16):
        pieces = [line + b"\\n"] if size is None else [line[i:i + size] for i in range(0, len(line), size)] + [b"\\n"]
        scanner = LineScanner(formats, "t")
        start = time.perf_counter()
        for piece in pieces:
            buf = bytearray(piece)
            scanner.feed(buf, len(buf))
        worst = max(worst, time.perf_counter() - start)
    print(worst)
    """
)

N = 64 * 1024
_ALL = ",".join(sorted(PRESETS))


@pytest.mark.parametrize(
    "presets,line",
    [
        ("lightning", "Epoch 1:  10%|" + "█" * (N // 3)),  # a bar that never ends
        ("lightning", "Epoch 1:  10%|█| 1/10 [" + ", loss=" * (N // 7)),  # loss keys without a number
        ("lightning", "Epoch 1:  10%|█| 1/10 [" + ", train_loss=" + "1" * N + "x"),
        ("lightning", "Epoch 1:  10%|█| 1/10 [" + ", train_loss_step" * (N // 17)),
        ("lightning", "Epoch " * (N // 6)),
        ("lightning", "Epoch 1:" + " " * N + "1%|"),
        ("lightning", "Epoch 1: 1%|" + " " * N + "| 1/"),
        ("lightning", "Epoch 1: 1%||" + " " * N + "1/1 "),
        ("lightning", "Epoch 1: 1%|" + "|" * N),
        ("lightning", "Epoch 1: " + "1" * N + "%|"),
        ("lightning", " " * N + "Epoch 1: 1%|"),
        (_ALL, "Epoch 1: 1%|█| 1/10 [" + " loss: " * (N // 7)),
        (_ALL, "Epoch 1:  10%|" + "1" * N),
    ],
    ids=["endless-bar", "loss-keys", "loss-digits", "loss-step-keys", "epoch-words", "spaces-before-percent",
         "spaces-in-bar", "spaces-before-count", "bars", "percent-digits", "leading-spaces", "all-loss-words",
         "all-bar-digits"],
)
def test_adversarial_lines_scan_in_linear_time(presets, line):
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, presets], input=line.encode(), capture_output=True,
                              timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scanning a {len(line)}-character line took more than 15 s (it hangs)")
    assert done.returncode == 0, done.stderr.decode()
    took = float(done.stdout)
    assert took < 1.0, f"the slowest way of feeding the line took {took:.2f} s"


# -- through the CLI --------------------------------------------------------------------------------


def test_stopstep_run_stops_a_lightning_style_trainer_at_its_global_step(tmp_path):
    # A stand-in for Trainer.fit on a pipe: 5 epochs of 20 batches, a validation bar after each.
    trainer = tmp_path / "fit.py"
    trainer.write_text(textwrap.dedent(
        """
        import sys, time
        out = sys.stdout
        for epoch in range(5):
            for n in range(21):
                pct = n * 100 // 20
                out.write(f"\\rEpoch {epoch}: {pct:>3}%|#####     | {n}/20 [00:01<00:01, 20.00it/s, v_num=0, train_loss=0.5]")
                out.flush()
                time.sleep(0.01)
            for v in range(5):
                out.write(f"\\n\\rValidation DataLoader 0: {v * 25:>3}%|##   | {v}/4 [00:00<00:00, 90.00it/s]\\x1b[A")
                out.flush()
        out.write("\\n")
        """))
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "stopstep_cli", "run", "--last-step", "50", "--preset", "lightning",
                           "--no-cooperative", "--report", str(report), "--", sys.executable, str(trainer)],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(report.read_text())
    assert summary["reason"] == "target_reached", summary
    # epoch 2 (0-based), batch 10: 2*20 + 10; a step or two of lag at 100 bars/s at most
    assert 50 <= summary["last_step_seen"] <= 53, summary
