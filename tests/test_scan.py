"""`stopstep scan`: what `stopstep run` would read from saved logs (or stdin) and from checkpoint
directories, through the real CLI (issue 11, item 3), and `stopstep presets` listing the default set.

The scan reads lines with the scanner run uses (LineScanner.read_line); a property test below feeds
random logs to both, in random pieces, and checks they see the same steps in the same order."""

from __future__ import annotations

import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

from stopstep_cli import scan as scanning
from stopstep_cli.patterns import resolve_formats
from stopstep_cli.scanner import LineScanner

STOPSTEP = [sys.executable, "-m", "stopstep_cli"]


def stopstep(*args, input=None, cwd=None):
    """Run `stopstep ARGS`; (status, stdout, stderr) as text."""
    done = subprocess.run(STOPSTEP + [str(a) for a in args], input=input, capture_output=True, timeout=120,
                          cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def scan_json(*args, input=None):
    status, out, err = stopstep("scan", "--json", *args, input=input)
    assert status in (0, 1), err
    assert err == ""
    return status, json.loads(out)


def log_file(tmp_path, data, name="train.log"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def fmt(result, name, log=0):
    (found,) = [f for f in result["logs"][log]["formats"] if f["name"] == name]
    return found


# -- logs ---------------------------------------------------------------------------------------------


def test_default_set_first_last_highest_with_line_numbers(tmp_path):
    path = log_file(tmp_path, "loading\nstep 5 loss 0.5\nnoise\nstep 9\nstep 7\n")
    status, result = scan_json(path)
    assert status == 0 and result["found"] and result["step"] == 9
    assert result["formats"] == [{"name": "default", "option": "the default set"}]
    (log,) = result["logs"]
    assert log["path"] == str(path) and log["lines"] == 5 and log["step"] == 9
    default = fmt(result, "default")
    assert default["lines"] == 3
    assert default["first"] == {"step": 5, "line": 2, "text": "step 5 loss 0.5"}
    assert default["last"] == {"step": 7, "line": 5, "text": "step 7"}
    assert default["highest"] == {"step": 9, "line": 4, "text": "step 9"}
    assert default["passed_over"] == {"count": 0, "kinds": []} and default["context_lines"] == 0
    assert log["unmatched"] == {"count": 0, "kinds": []}
    assert result["checkpoint_dirs"] == []


def test_the_human_answer(tmp_path):
    path = log_file(tmp_path, "Epoch 1/3\nstep 5\n 50/100 ━━━━ 1s 10ms/step - loss: 0.1\nstep 12\n")
    status, out, err = stopstep("scan", path)
    assert status == 0 and err == ""
    assert out.splitlines() == [
        f"{path}: 4 lines",
        "  the default set  2 lines with a step: first step 5 at line 2, last 12 at line 4, highest 12 at line 4",
        "  looked like a step but matched no format: 2 lines, 2 kinds",
        "    1 x like line 1: Epoch 1/3",
        "        --preset keras would read it",
        "    1 x like line 3: 50/100 ━━━━ 1s 10ms/step - loss: 0.1",
        "        --preset keras would read it",
        "  highest step 12 at line 4 (the default set)",
    ]


def test_no_step_exits_1(tmp_path):
    path = log_file(tmp_path, "nothing to see\nEpoch 1/3\n")
    status, out, err = stopstep("scan", path)
    assert status == 1 and err == "" and out.splitlines()[-1] == "no step found"
    status, result = scan_json(path)
    assert status == 1 and result["found"] is False and result["step"] is None
    assert fmt(result, "default")["first"] is None


def test_stdin_with_dash_and_without_a_file():
    data = b"step 1\nstep 2\n"
    for args in (["-"], []):
        status, result = scan_json(*args, input=data)
        assert status == 0 and result["logs"][0]["path"] == "-" and result["step"] == 2
    status, out, _err = stopstep("scan", input=data)
    assert out.startswith("stdin: 2 lines")
    status, out, err = stopstep("scan")  # stdin empty (not a terminal): read, nothing found
    assert status == 1 and out.startswith("stdin: 0 lines")


def test_progress_bars_ansi_rank_prefixes_invalid_utf8_and_a_last_line_without_newline(tmp_path):
    data = (b"\x1b[32m[rank1]: step 3\x1b[0m\r\n"  # CRLF: \r and \n both end a line, numbers count \n
            b"\r 10%|#         | 100/1000 [00:25<03:45,  4.00it/s]"
            b"\r 20%|##        | 200/1000 [00:25<03:45,  4.00it/s]\n"  # two bars on line 2
            b"\xff\xfe junk \xc3\n"
            b"[default0]:\x1b[1mstep 4\x1b[0m loss nan")  # no newline at the end
    path = log_file(tmp_path, data)
    status, result = scan_json(path, "--preset", "hf", "--pattern", r"step (?P<step>\d+)")
    assert status == 0 and result["logs"][0]["lines"] == 4
    hf = fmt(result, "hf")
    assert (hf["lines"], hf["first"]["line"], hf["last"]["line"], hf["last"]["step"]) == (2, 2, 2, 200)
    assert hf["last"]["text"] == "20%|##        | 200/1000 [00:25<03:45,  4.00it/s]"
    pattern = fmt(result, "pattern")
    assert pattern["option"] == "--pattern 'step (?P<step>\\d+)'"
    assert [pattern["first"]["step"], pattern["first"]["line"], pattern["first"]["text"]] == [3, 1, "step 3"]
    assert [pattern["last"]["step"], pattern["last"]["line"], pattern["last"]["text"]] == [4, 4, "step 4 loss nan"]
    assert result["step"] == 200


def test_what_run_misses_the_scan_misses_too(tmp_path):
    # A --pattern's literal word ("step") is looked for in the raw bytes, before ANSI codes are
    # removed: a colour code inside the word hides the line from run, and so from the scan, which
    # says so.
    line = b"st\x1b[1mep\x1b[0m 4\n"
    formats = resolve_formats([r"step (?P<step>\d+)"])
    scanner = LineScanner(formats, "stdout")
    assert scanner.feed(bytearray(line), len(line)) == []
    status, result = scan_json(log_file(tmp_path, line), "--pattern", r"step (?P<step>\d+)")
    assert status == 1
    assert result["logs"][0]["unmatched"]["kinds"] == [{"count": 1, "line": 1, "text": "step 4", "presets": []}]


def test_each_line_counts_for_the_first_format_that_gives_a_step(tmp_path):
    # as in run: formats are tried in order (patterns, then presets); the first step wins
    path = log_file(tmp_path, "step 10\ngs=20 step 30\n")
    _status, result = scan_json(path, "--pattern", r"gs=(?P<step>\d+)", "--preset", "torchtitan")
    assert [f["name"] for f in result["logs"][0]["formats"]] == ["pattern", "torchtitan"]
    assert fmt(result, "pattern")["lines"] == 1 and fmt(result, "pattern")["first"]["step"] == 20
    assert fmt(result, "torchtitan")["lines"] == 0
    # the default set is not added to a preset, so "step 10" looked like a step
    assert result["logs"][0]["unmatched"]["kinds"][0] == {"count": 1, "line": 1, "text": "step 10", "presets": []}


def test_lines_a_format_matched_without_a_step_say_why(tmp_path):
    data = ("Map: 100%|█| 1000/1000 [00:00<00:00, 5000 examples/s]\n"  # datasets bar: a description
            " 10%|█         | 100/1000 [00:25<03:45,  4.00it/s]\n"
            "100%|██████████| 8/8 [00:01<00:00,  6.00it/s]\n"  # an evaluation bar
            "100%|██████████| 8/8 [00:01<00:00,  6.00it/s]\n"
            " 11%|█         | 110/1000 [00:27<03:45,  4.00it/s]\n")
    _status, result = scan_json(log_file(tmp_path, data), "--preset", "hf")
    hf = fmt(result, "hf")
    assert hf["lines"] == 2 and hf["highest"]["step"] == 110
    assert hf["passed_over"]["count"] == 2
    (kind,) = hf["passed_over"]["kinds"]
    assert kind["count"] == 2 and kind["line"] == 3 and "total 8 is not the first bar's 1000" in kind["why"]
    unmatched = result["logs"][0]["unmatched"]
    assert unmatched["count"] == 1 and unmatched["kinds"][0]["text"].startswith("Map: 100%")


def test_keras_epoch_lines_are_context(tmp_path):
    data = (" 5/10 ━━━━ 1s 10ms/step - loss: 0.9\n"  # before any Epoch line: no step yet
            "Epoch 2/3\n"
            "\x08\x08\r 5/10 ━━━━━━━━ 1s 10ms/step - loss: 0.4\r10/10 ━━━━━━━━━━ 1s 10ms/step - loss: 0.3\n"
            "Epoch 3/3\n"
            " 4/10 ━━━━ 1s 10ms/step - loss: 0.2")
    status, result = scan_json(log_file(tmp_path, data), "--preset", "keras")
    keras = fmt(result, "keras")
    assert status == 0 and keras["context_lines"] == 2
    assert (keras["lines"], keras["first"]["step"], keras["highest"]["step"], keras["last"]["step"]) == (3, 15, 24, 24)
    assert keras["passed_over"]["kinds"][0]["line"] == 1 and "Epoch" in keras["passed_over"]["kinds"][0]["why"]
    assert result["logs"][0]["unmatched"]["count"] == 0  # the Epoch lines are not "unmatched"


def test_lightning_log_through_scan(tmp_path):
    bar = "\rEpoch {e}: {p:>3}%|##   | {n}/10 [00:01<00:01, 9.00it/s, v_num=0, train_loss=0.5]"
    data = "\rSanity Checking DataLoader 0: 100%|#####| 2/2 [00:00<00:00, 9.00it/s]\x1b[A\n"
    for e in range(2):
        data += "".join(bar.format(e=e, n=n, p=n * 10) for n in range(11))
        data += "\n\rValidation DataLoader 0:  50%|##   | 4/8 [00:00<00:00, 9.00it/s]\x1b[A\n"
    _status, result = scan_json(log_file(tmp_path, data), "--preset", "lightning")
    lightning = fmt(result, "lightning")
    assert lightning["lines"] == 22 and lightning["first"]["step"] == 0 and lightning["highest"]["step"] == 20
    assert lightning["highest"]["line"] == 4
    kinds = result["logs"][0]["unmatched"]["kinds"]
    assert [k["count"] for k in kinds] == [2, 1]  # the validation bars, then the sanity check
    assert kinds[0]["text"].startswith("Validation DataLoader 0:") and kinds[0]["line"] == 3
    assert kinds[0]["presets"] == kinds[1]["presets"] == []  # no preset reads them
    # read with the default set, the training bars are the lines that looked like a step, and
    # the scan names the preset that reads them
    status, out, _err = stopstep("scan", log_file(tmp_path, data))
    assert status == 1
    assert "    22 x like line 2: Epoch 0:   0%|##   | 0/10 [00:01<00:01, 9.00it/s, v_num=0, train_loss=0.5]\n" \
           "        --preset lightning would read them\n" in out


def test_only_a_few_kinds_of_unmatched_lines_are_shown(tmp_path):
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
    lines = [f"{name}: steps done {i}" for name in names for i in range(3)]  # 9 kinds, other numbers
    status, out, _err = stopstep("scan", log_file(tmp_path, "\n".join(lines) + "\n"))
    assert status == 1
    assert "looked like a step but matched no format: 27 lines, 9 kinds" in out
    assert out.count(" x like line ") == 5 and "... and 4 more kinds" in out
    _status, result = scan_json(log_file(tmp_path, "\n".join(lines) + "\n"))
    assert result["logs"][0]["unmatched"]["count"] == 27 and len(result["logs"][0]["unmatched"]["kinds"]) == 5


def test_the_kinds_remembered_are_bounded():
    kinds = scanning.Kinds()
    for i in range(scanning.MAX_KINDS * 3):
        kinds.add(f"kind {i}", i + 1, "text")
    assert kinds.count == scanning.MAX_KINDS * 3 and kinds.kinds == scanning.MAX_KINDS
    assert [first.line for _key, _count, first in kinds.top()] == [1, 2, 3, 4, 5]


def test_lines_are_read_to_64_kib_as_in_run(tmp_path):
    data = b"x" * (70 * 1024) + b" step 5\n" + b"step 6 " + b"y" * (70 * 1024) + b"\n"
    _status, result = scan_json(log_file(tmp_path, data))
    default = fmt(result, "default")
    assert default["lines"] == 1 and default["first"]["step"] == 6 and default["first"]["line"] == 2
    assert len(default["first"]["text"]) <= 160


def test_lines_across_read_boundaries_and_a_file_larger_than_a_read(tmp_path):
    # 1 MiB reads: put step lines (and a \r bar) across the boundaries of the first reads
    filler = b"noise line\n"
    body = bytearray()
    expected = []
    line = 1
    while len(body) < 3 * scanning.CHUNK + 100:
        boundary = (len(body) // scanning.CHUNK + 1) * scanning.CHUNK
        if boundary - len(body) < 40:
            body += b"step %d with\rstep %d after\n" % (line, line + 100000)
            expected += [(line, line), (line + 100000, line)]
        else:
            body += filler
        line += 1
    status, result = scan_json(log_file(tmp_path, bytes(body)))
    default = fmt(result, "default")
    assert status == 0 and result["logs"][0]["lines"] == line - 1
    assert default["lines"] == len(expected) == 6
    assert (default["first"]["step"], default["first"]["line"]) == expected[0]
    assert (default["last"]["step"], default["last"]["line"]) == expected[-1]


def test_a_huge_log_streams_in_flat_memory(tmp_path):
    # 80 MiB on stdin, most of it one line without a terminator, then a step: memory stays flat
    child = textwrap.dedent(f"""
        import resource, subprocess, sys
        proc = subprocess.Popen({STOPSTEP!r} + ["scan", "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        block = b"x" * (1 << 20)
        for _ in range(80):
            proc.stdin.write(block)
        proc.stdin.write(b"\\nstep 77\\n" + b"step 78 no newline")
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait()
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        sys.stdout.write(out.decode())
        """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    rss_kib, _, out = done.stdout.decode().partition("\n")
    result = json.loads(out)
    default = result["logs"][0]["formats"][0]
    assert result["logs"][0]["lines"] == 3 and default["highest"] == {"step": 78, "line": 3,
                                                                     "text": "step 78 no newline"}
    assert int(rss_kib) < 80 * 1024, f"{int(rss_kib) // 1024} MiB for an 80 MiB log"


def test_several_files_each_with_its_own_scanner(tmp_path):
    a = log_file(tmp_path, " 10%|█         | 100/1000 [00:25<03:45,  4.00it/s]\n", "a.log")
    b = log_file(tmp_path, "100%|██████████| 8/8 [00:01<00:00,  6.00it/s]\n", "b.log")
    status, result = scan_json(a, b, "--preset", "hf")
    # b's bar is the first bar b's scanner sees, so it locks onto its total, as a --log-file of its own would
    assert status == 0 and [log["step"] for log in result["logs"]] == [100, 8] and result["step"] == 100


# -- the scan reads what run reads ----------------------------------------------------------------------

_PIECES = [
    "step {n} loss 0.5", "[rank1]: step {n}", "\x1b[1mstep\x1b[0m {n}", "Epoch {e}/9", "iteration {n}",
    " {n}/50 ━━━━━━━━━━ 1s 10ms/step - loss: 0.12",
    "Epoch {e}:  45%|████▌     | {n}/100 [00:01<00:02, 40.00it/s, v_num=0, train_loss=0.123]",
    " 10%|█         | {n}/1000 [00:25<03:45,  4.00it/s]", "100%|##########| 8/8 [00:01<00:00,  6.00it/s]",
    "Validation DataLoader 0:  50%|█████     | 4/8 [00:00<00:00, 9.00it/s]\x1b[A", "", "x" * 300,
    "y" * 70000 + " step {n}", "step " + "9" * 30,
]


def _random_log(rnd):
    out = []
    for _ in range(rnd.randint(1, 120)):
        out.append(rnd.choice(_PIECES).format(n=rnd.randint(0, 999), e=rnd.randint(1, 5)).encode())
        out.append(rnd.choice([b"\n", b"\r", b"\r\n", b"\n"]))
    if rnd.random() < 0.5:
        out.pop()  # a last line without a terminator
    return b"".join(out)


def _pieces(data, rnd):
    pos = 0
    while pos < len(data):
        size = rnd.choice([1, 5, 64, 4096, 1 << 20]) if pos < 2000 else rnd.choice([509, 4096, 1 << 20])
        yield data[pos:pos + size]
        pos += size


@pytest.mark.parametrize("presets", [[], ["hf"], ["keras"], ["lightning"], ["lightning", "hf", "keras"]],
                         ids=lambda p: "+".join(p) or "default")
def test_the_scan_sees_the_steps_run_sees_in_the_same_order(presets):
    formats = resolve_formats(presets=presets)
    rnd = random.Random(11)
    for _ in range(100):
        data = _random_log(rnd)
        # run: reads of any size (no coalescing here: every candidate line examined)
        scanner = LineScanner(formats, "stdout", max_lines=10 ** 9)
        run_steps = []
        for piece in _pieces(data, random.Random(rnd.random())):
            buf = bytearray(piece)
            run_steps += [o.step for o in scanner.feed(buf, len(buf))]
        run_steps += [o.step for o in scanner.end_of_stream()]
        # scan: its own reads, line by line
        scan_steps = []
        reads = _pieces(data, random.Random(rnd.random()))
        scanning.scan_stream(lambda size: next(reads, b""), formats,
                             on_line=lambda n, raw, v: v.observation and scan_steps.append(v.observation.step))
        assert scan_steps == run_steps, data[:400]


# -- checkpoint directories ---------------------------------------------------------------------------


def zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", os.urandom(512))
    return buf.getvalue()


def write(path, data=b"x", age=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data if isinstance(data, bytes) else data.encode())
    if age is not None:
        past = time.time() - age
        os.utime(path, (past, past))


def survey(result, index=0):
    found = result["checkpoint_dirs"][index]
    return found, {c["name"]: (c["step"], c["complete"], c["why"]) for c in found["checkpoints"]}


def test_hf_checkpoints_complete_and_not_and_why(tmp_path):
    out = tmp_path / "out"
    write(out / "checkpoint-10" / "trainer_state.json", '{"global_step": 10}')
    write(out / "checkpoint-20" / "trainer_state.json", '{"global_step": 5}')
    write(out / "checkpoint-30" / "model.safetensors")
    write(out / "checkpoint-40" / "trainer_state.json", '{"global_st')
    write(out / "tmp-checkpoint-50" / "trainer_state.json", '{"global_step": 50}')
    write(out / "runs" / "events")
    status, result = scan_json("--checkpoint-dir", out)
    assert status == 0 and result["step"] == 10 and result["logs"] == [] and result["formats"] == []
    found, checkpoints = survey(result)
    assert (found["layout"], found["detected"], found["entries"], found["step"]) == ("hf", True, 6, 10)
    assert checkpoints == {
        "checkpoint-10": (10, True, None),
        "checkpoint-20": (20, False, "global_step is 5, not 20"),
        "checkpoint-30": (30, False, "trainer_state.json missing"),
        "checkpoint-40": (40, False, "trainer_state.json does not parse (still being written?)"),
    }
    assert found["ignored"] == [{"name": "tmp-checkpoint-50", "why": "a temporary name, never counted"}]
    assert [c["path"] for c in found["checkpoints"]][0] == str(out / "checkpoint-10")


def test_the_human_answer_for_a_checkpoint_dir(tmp_path):
    write(tmp_path / "checkpoint-10" / "trainer_state.json", '{"global_step": 10}')
    write(tmp_path / "checkpoint-20" / "model.safetensors")
    status, out, err = stopstep("scan", "--checkpoint-dir", tmp_path)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{tmp_path}: layout hf (detected), 2 checkpoints"
    assert lines[1].split() == ["checkpoint-10", "step", "10", "complete"]
    assert lines[2].split(None, 3)[:3] == ["checkpoint-20", "step", "20"]
    assert lines[2].endswith("not complete: trainer_state.json missing")
    assert lines[3] == "  latest complete checkpoint: step 10 (checkpoint-10)"


def test_lightning_zip_checkpoints(tmp_path):
    data = zip_bytes()
    write(tmp_path / "epoch=0-step=100.ckpt", data)
    write(tmp_path / "epoch=1-step=200.ckpt", data[: len(data) // 2])
    write(tmp_path / "epoch=1-step=200-v1.ckpt", data + b"tail")
    write(tmp_path / "last.ckpt", data)
    status, result = scan_json("--checkpoint-dir", tmp_path)
    found, checkpoints = survey(result)
    assert status == 0 and found["layout"] == "lightning" and found["step"] == 100
    assert checkpoints["epoch=0-step=100.ckpt"] == (100, True, None)
    assert checkpoints["epoch=1-step=200.ckpt"][1:] == (False, "zip end record missing (still being written?)")
    assert checkpoints["epoch=1-step=200-v1.ckpt"][1] is False
    assert "last.ckpt" not in checkpoints


def test_tf_deepspeed_megatron_reasons(tmp_path):
    tf = tmp_path / "tf"
    write(tf / "ckpt-1.index")
    write(tf / "ckpt-1.data-00000-of-00001")
    write(tf / "ckpt-2.index")
    write(tf / "ckpt-2.data-00000-of-00002")
    write(tf / "ckpt-3.index")
    write(tf / "ckpt-3.data-00000-of-00001")
    write(tf / "checkpoint", 'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\n'
                             'all_model_checkpoint_paths: "ckpt-2"\n')
    ds = tmp_path / "ds"
    data = zip_bytes()
    write(ds / "global_step40" / "mp_rank_00_model_states.pt", data)
    write(ds / "global_step50" / "mp_rank_00_model_states.pt", data)
    write(ds / "latest", "global_step40")
    mg = tmp_path / "mg"
    write(mg / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt", data)
    write(mg / "latest_checkpointed_iteration.txt", "release")
    status, result = scan_json("--checkpoint-dir", tf, "--checkpoint-dir", ds, "--checkpoint-dir", mg)
    assert status == 0 and result["step"] == 40
    found, checkpoints = survey(result, 0)
    assert found["layout"] == "tf" and checkpoints == {
        "ckpt-1": (1, True, None),
        "ckpt-2": (2, False, "1 of its 2 data shards"),
        "ckpt-3": (3, False, "not named in the checkpoint state file"),
    }
    found, checkpoints = survey(result, 1)
    assert found["layout"] == "deepspeed" and checkpoints == {
        "global_step40": (40, True, None),
        "global_step50": (50, False, "`latest` names global_step40"),
    }
    found, checkpoints = survey(result, 2)
    assert found["layout"] == "megatron" and found["step"] is None
    assert checkpoints == {"iter_0000100": (100, False, "latest_checkpointed_iteration.txt says 'release', "
                                                        "not an iteration")}


def test_generic_layout_and_checkpoint_pattern(tmp_path):
    write(tmp_path / "model_7.bin", b"\0" * 10, age=60)  # untouched for a minute: complete
    write(tmp_path / "model_9.bin", b"\0" * 10)  # just written
    status, result = scan_json("--checkpoint-dir", tmp_path, "--layout", "generic")
    found, checkpoints = survey(result)
    assert status == 0 and (found["layout"], found["detected"]) == ("generic", False)
    assert checkpoints == {"model_7.bin": (7, True, None),
                           "model_9.bin": (9, False, "changed within the last second")}
    write(tmp_path / "run1" / "weights-40.bin", age=60)
    status, result = scan_json("--checkpoint-dir", tmp_path, "--checkpoint-pattern", r"run1/weights-(?P<step>\d+)")
    found, checkpoints = survey(result)
    assert status == 0 and found["layout"] == "generic" and checkpoints == {"run1/weights-40.bin": (40, True, None)}


def test_a_directory_without_a_recognised_layout(tmp_path):
    write(tmp_path / "notes.txt")
    status, out, _err = stopstep("scan", "--checkpoint-dir", tmp_path)
    assert status == 1 and "no layout recognised among its 1 entry" in out and "--layout" in out
    status, result = scan_json("--checkpoint-dir", tmp_path)
    assert status == 1 and result["checkpoint_dirs"][0]["layout"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    status, out, _err = stopstep("scan", "--checkpoint-dir", empty)
    assert status == 1 and f"{empty}: empty" in out


def test_logs_and_checkpoints_together(tmp_path):
    path = log_file(tmp_path, "step 3\n")
    write(tmp_path / "ck" / "checkpoint-20" / "trainer_state.json", '{"global_step": 20}')
    status, result = scan_json(path, "--checkpoint-dir", tmp_path / "ck")
    assert status == 0 and result["step"] == 20 and result["logs"][0]["step"] == 3
    # without a FILE, --checkpoint-dir alone does not read stdin
    status, result = scan_json("--checkpoint-dir", tmp_path / "ck", input=b"step 99\n")
    assert result["logs"] == [] and result["step"] == 20


# -- usage errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["{tmp}/missing.log"], "cannot read {tmp}/missing.log: No such file or directory"),
        (["{tmp}"], "{tmp} is a directory (for checkpoints: --checkpoint-dir {tmp})"),
        (["/proc/self/mem"], "cannot read /proc/self/mem: Input/output error"),  # fails while read
        (["-", "-"], "- (stdin) given more than once"),
        (["--pattern", "(", "{tmp}/a.log"], "does not compile"),
        (["--pattern", r"(?<!x)step (\d+)", "{tmp}/a.log"], "lookbehind"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--layout", "hf"], "--layout needs --checkpoint-dir"),
        (["--checkpoint-pattern", "x(\\d+)"], "--checkpoint-pattern needs --checkpoint-dir"),
        (["--checkpoint-dir", "{tmp}", "--checkpoint-pattern", "("], "--checkpoint-pattern '(' does not compile"),
        (["--checkpoint-dir", "{tmp}", "--layout", "hf", "--checkpoint-pattern", "x(\\d+)"],
         "--checkpoint-pattern is for the generic layout"),
        (["--checkpoint-dir", "{tmp}/nowhere"], "--checkpoint-dir {tmp}/nowhere: No such file or directory"),
        (["--checkpoint-dir", "{tmp}/a.log"], "--checkpoint-dir {tmp}/a.log is not a directory"),
        (["--layout", "nope", "--checkpoint-dir", "{tmp}"], "Invalid value for '--layout'"),
        (["--bogus"], "No such option"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "a.log").write_text("step 1\n")
    status, out, err = stopstep("scan", *[a.format(tmp=tmp_path) for a in args])
    assert status == 2, (out, err)
    assert out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("stopstep: error: ")
    assert message.format(tmp=tmp_path) in err


def test_an_error_in_a_later_file_comes_before_any_output(tmp_path):
    path = log_file(tmp_path, "step 1\n")
    status, out, err = stopstep("scan", path, tmp_path / "missing.log")
    assert status == 2 and out == "" and "missing.log" in err


def test_a_reader_that_stops_reading_is_no_traceback_and_keeps_the_status(tmp_path):
    path = log_file(tmp_path, "step 5\n" + "".join(f"{k} steps left\n" * 50 for k in "abcdefgh"))
    # 300 files: more output than a pipe holds, so the writes meet the closed pipe (| head -c 1)
    proc = subprocess.Popen(STOPSTEP + ["scan"] + [str(path)] * 300, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout.read(1) == b"/"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and err == b""  # a step was found: 0, as if it had all been read


@pytest.mark.parametrize(
    "text,looks",
    [("Epoch 1/3", True), ("global_step: 7", True), ("Iteration 4", True), ("steps: 10", True),
     (" 45/ 100 done", True), ("50%|#####", True), ("num_updates=3", True), ("timestep 10", False),
     ("interval 10", False), ("loading the model", False), ("lr 0.1", False)],
)
def test_what_looks_like_a_step(text, looks):
    assert scanning.looks_like_a_step(text) is looks


# -- presets --------------------------------------------------------------------------------------------


_READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}


def _reading_stdin(pid: int) -> bool:
    """Whether the process is blocked in read(0, ...) now (its /proc syscall line)."""
    import platform

    try:
        with open(f"/proc/{pid}/syscall") as fh:
            fields = fh.read().split()
    except OSError:
        return False
    return fields[:2] == [_READ_SYSCALL.get(platform.machine()), "0x0"]


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)],
                         ids=["ctrl-c", "sigterm"])
def test_a_scan_of_input_that_never_ends_stops_when_asked(signum, status):
    if platform.machine() not in _READ_SYSCALL:
        pytest.skip("the read syscall's number is known here for x86_64 and aarch64 only")
    proc = subprocess.Popen(STOPSTEP + ["scan", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"step 1\n")
        proc.stdin.flush()  # and then nothing, as from a pipe whose writer never ends
        deadline = time.monotonic() + 60
        while not _reading_stdin(proc.pid):
            assert time.monotonic() < deadline and proc.poll() is None, "scan never waited on stdin"
            time.sleep(0.01)
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == status
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_a_checkpoint_file_that_is_not_a_regular_file_holds_nothing_up(tmp_path, kind):
    state = tmp_path / "out" / "checkpoint-20" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(state)
    else:
        state.symlink_to("/dev/zero")
    status, out, err = stopstep("scan", "--checkpoint-dir", tmp_path / "out", "--layout", "hf")
    assert status == 1, err
    assert "checkpoint-20" in out and "not a regular file" in out
    run = subprocess.run(STOPSTEP + ["run", "--last-step", "20", "--checkpoint-dir", str(tmp_path / "out"),
                                     "--layout", "hf", "--", sys.executable, "-c", "print('training')"],
                         capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and run.stdout == b"training\n", run.stderr
    assert b"before step 20" in run.stderr


def test_the_generic_layout_counts_no_fifo_or_device_as_a_checkpoint(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    write(out / "ckpt-5", age=3600)
    (out / "ckpt-9").symlink_to("/dev/zero")
    os.mkfifo(out / "ckpt-11")
    (out / "ckpt-13").mkdir()
    os.mkfifo(out / "ckpt-13" / "weights")
    status, result = scan_json("--checkpoint-dir", out, "--layout", "generic")
    _found, checkpoints = survey(result)
    assert status == 0
    assert checkpoints == {"ckpt-5": (5, True, None),
                           **{f"ckpt-{n}": (n, False, "cannot be read (not a regular file)") for n in (9, 11, 13)}}


def test_a_binary_log_is_shown_escaped(tmp_path):
    path = log_file(tmp_path, b"step: \x07\x01 abc\x0c\x1b[2J\n")
    status, out, err = stopstep("scan", path)
    assert status == 1, err
    assert "step: \\x07\\x01 abc" in out
    assert not any(c in out for c in "\x07\x01\x0c\x1b")


def test_presets_lists_the_default_set_first_with_its_sample():
    status, out, err = stopstep("presets")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "default set, used when neither --pattern nor --preset is given:"
    assert "step 10, Step: 10, step=10, global_step = 10, iter 10, iteration 10" in lines[1]
    assert lines[2].split() == ["e.g.", "step", "10", "loss", "2.31"]
    assert lines[4] == "presets (--preset NAME, repeatable):"
    names = [line.split()[0] for line in lines[5:] if not line.startswith(" ")]
    assert names == sorted(names) and "lightning" in names and "hf" in names
    assert any("e.g. Epoch 2:  45%|" in line for line in lines)
