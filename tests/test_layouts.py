"""Checkpoint layouts built on disk the way each framework writes them,
including the states in between: stopstep never counts an unfinished one."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile

import pytest

from stopstep_cli.layouts import detect_layout, safetensors_is_whole, zip_is_whole
from stopstep_cli.sources import CheckpointSource


def zip_bytes(size=4096):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", os.urandom(size))
    return buf.getvalue()


def write(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data if isinstance(data, bytes) else data.encode())


class Dir:
    """A checkpoint directory and a source watching it (events simulated by listing)."""

    def __init__(self, root, layout="auto", pattern=None):
        self.root = str(root)
        self.source = CheckpointSource(self.root, layout, pattern)
        self.source.resume_point()
        self.source.start(None)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def steps(self):
        """Steps that became complete since the last look (every path counts as changed)."""
        changed = [os.path.join(d, n) for d, ds, fs in os.walk(self.root) for n in ds + fs]
        return [obs.step for obs in self.source.on_change(changed)]


# -- file checks -----------------------------------------------------------------------


def test_zip_check_whole_truncated_and_appended(tmp_path):
    data = zip_bytes()
    path = tmp_path / "a.pt"
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        assert not zip_is_whole(str(path)), cut
    path.write_bytes(data)
    assert zip_is_whole(str(path))
    path.write_bytes(data + data[:100])  # a second save still being written over the first
    assert not zip_is_whole(str(path))


def test_zip64_check(tmp_path, monkeypatch):
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1)  # force the zip64 end records
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", allowZip64=True) as zf:
        for i in range(3):
            zf.writestr(f"f{i}", os.urandom(100))
    data = buf.getvalue()
    assert b"PK\x06\x06" in data
    path = tmp_path / "big.pt"
    path.write_bytes(data)
    assert zip_is_whole(str(path))
    path.write_bytes(data[:-30])
    assert not zip_is_whole(str(path))


def test_safetensors_check(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 16
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert safetensors_is_whole(str(path))
    path.write_bytes(data[:-1])
    assert not safetensors_is_whole(str(path))


# -- layouts -------------------------------------------------------------------------------


def test_hf(tmp_path):
    d = Dir(tmp_path, "hf")
    os.makedirs(d.path("checkpoint-10"))
    assert d.steps() == []
    write(d.path("checkpoint-10", "model.safetensors"), b"\0" * 100)
    write(d.path("checkpoint-10", "trainer_state.json"), '{"global_st')  # being written
    assert d.steps() == []
    write(d.path("checkpoint-10", "trainer_state.json"), '{"global_step": 10}')
    assert d.steps() == [10]
    write(d.path("tmp-checkpoint-20", "trainer_state.json"), '{"global_step": 20}')
    assert d.steps() == []
    os.rename(d.path("tmp-checkpoint-20"), d.path("checkpoint-20"))
    assert d.steps() == [20]
    write(d.path("checkpoint-30", "trainer_state.json"), '{"global_step": 5}')  # not this checkpoint's state
    assert d.steps() == []


def test_lightning(tmp_path):
    d = Dir(tmp_path, "lightning")
    data = zip_bytes()
    write(d.path("epoch=0-step=100.ckpt"), data[: len(data) // 2])
    write(d.path("last.ckpt"), data)
    assert d.steps() == []
    write(d.path("epoch=0-step=100.ckpt"), data)
    assert d.steps() == [100]
    write(d.path("epoch=1-step=200-v1.ckpt"), data)
    assert d.steps() == [200]


def test_tf(tmp_path):
    d = Dir(tmp_path, "tf")
    write(d.path("ckpt-3.data-00000-of-00002"))
    write(d.path("ckpt-3.index"))
    assert d.steps() == []  # no state file yet
    write(d.path("checkpoint"), 'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n')
    assert d.steps() == []  # the state file names another one
    write(d.path("checkpoint"), 'model_checkpoint_path: "/abs/dir/ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
    assert d.steps() == []  # a data shard is missing
    write(d.path("ckpt-3.data-00001-of-00002"))
    assert d.steps() == [3]
    write(d.path("model.ckpt-1000.index"))
    write(d.path("model.ckpt-1000.data-00000-of-00001"))
    write(d.path("checkpoint"), 'model_checkpoint_path: "model.ckpt-1000"\n')
    assert d.steps() == [1000]


def test_deepspeed(tmp_path):
    d = Dir(tmp_path, "deepspeed")
    data = zip_bytes()
    write(d.path("global_step10", "mp_rank_00_model_states.pt"), data)
    write(d.path("global_step10", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), data[:100])
    assert d.steps() == []
    write(d.path("latest"), "")  # the pointer, written in place, still empty
    assert d.steps() == []
    write(d.path("latest"), "global_step10")
    assert d.steps() == []  # named, but a states file is still being written
    write(d.path("global_step10", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), data)
    assert d.steps() == [10]


def test_megatron(tmp_path):
    d = Dir(tmp_path, "megatron")
    write(d.path("iter_0000100", "mp_rank_00", "model_optim_rng.pt"), zip_bytes())
    assert d.steps() == []
    write(d.path("latest_checkpointed_iteration.txt"), "")
    assert d.steps() == []
    write(d.path("latest_checkpointed_iteration.txt"), "100")
    assert d.steps() == [100]


def test_orbax(tmp_path):
    d = Dir(tmp_path, "orbax")
    write(d.path("100.orbax-checkpoint-tmp-1234", "default", "data"))
    assert d.steps() == []
    os.rename(d.path("100.orbax-checkpoint-tmp-1234"), d.path("100"))
    assert d.steps() == [100]
    # on an object store the marker decides, once it has been seen
    write(d.path("200", "default", "data"))
    write(d.path("200", "commit_success.txt"))
    assert d.steps() == [200]
    write(d.path("300", "default", "data"))
    assert d.steps() == []
    write(d.path("300", "commit_success.txt"))
    assert d.steps() == [300]


def test_torchtitan(tmp_path):
    d = Dir(tmp_path, "torchtitan")
    write(d.path("step-10", "__0_0.distcp"))
    assert d.steps() == []
    write(d.path("step-10", ".metadata"))
    assert d.steps() == [10]


def test_mmengine(tmp_path):
    d = Dir(tmp_path, "mmengine")
    data = zip_bytes()
    write(d.path("iter_50.pth"), data)
    write(d.path("last_checkpoint"), d.path("iter_50.pth"))
    assert d.steps() == [50]
    write(d.path("iter_100.pth"), data)
    assert d.steps() == []  # the pointer still names iter_50
    write(d.path("epoch_1.pth"), data)
    write(d.path("last_checkpoint"), d.path("iter_100.pth"))
    assert d.steps() == [100]


def test_composer(tmp_path):
    d = Dir(tmp_path, "composer")
    write(d.path("ep0-ba100-rank0.pt"), zip_bytes())
    assert d.steps() == []
    os.symlink("ep0-ba100-rank0.pt", d.path("latest-rank0.pt"))
    assert d.steps() == [100]


def test_fairseq(tmp_path):
    d = Dir(tmp_path, "fairseq")
    write(d.path("checkpoint_1_100.pt.tmp"), zip_bytes())
    assert d.steps() == []
    os.rename(d.path("checkpoint_1_100.pt.tmp"), d.path("checkpoint_1_100.pt"))
    write(d.path("checkpoint_last.pt"), zip_bytes())
    assert d.steps() == [100]


def test_generic_waits_for_two_equal_looks(tmp_path):
    d = Dir(tmp_path, "generic")
    d.source.layout.state["settle"] = 0.2
    write(d.path("model_7.bin"), b"\0" * 10)
    assert d.steps() == []  # first look
    deadline = time.monotonic() + 10
    got = []
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
        got = d.steps()
    assert got == [7]


def test_checkpoint_pattern_on_relative_paths(tmp_path):
    d = Dir(tmp_path, "generic", pattern=r"run1/weights-(?P<step>\d+)\.bin$")
    old = d.path("run1", "weights-40.bin")
    write(old, b"\0")
    past = time.time() - 60
    os.utime(old, (past, past))  # untouched for long: whole at the first look
    write(d.path("run2", "weights-90.bin"), b"\0")
    assert d.steps() == [40]


def test_auto_detects_the_layout_when_checkpoints_appear(tmp_path):
    d = Dir(tmp_path / "out")  # not there yet
    assert d.steps() == []
    write(d.path("checkpoint-5", "trainer_state.json"), '{"global_step": 5}')
    assert d.steps() == [5]
    assert d.source.layout.name == "hf"


@pytest.mark.parametrize(
    "names,layout",
    [
        (["checkpoint-10", "runs"], "hf"),
        (["epoch=0-step=10.ckpt"], "lightning"),
        (["checkpoint", "ckpt-1.index"], "tf"),
        (["latest", "global_step10"], "deepspeed"),
        (["latest_checkpointed_iteration.txt"], "megatron"),
        (["step-10"], "torchtitan"),
        (["last_checkpoint", "iter_10.pth"], "mmengine"),
        (["ep0-ba10-rank0.pt"], "composer"),
        (["checkpoint_1_10.pt"], "fairseq"),
        (["10", "20"], "orbax"),
        (["notes.txt"], None),
    ],
)
def test_detect_layout(names, layout):
    found = detect_layout(names)
    assert (found.name if found else None) == layout


def test_resume_scan_takes_the_latest_complete_checkpoint(tmp_path):
    for step in (100, 200):
        write(tmp_path / f"checkpoint-{step}" / "trainer_state.json", json.dumps({"global_step": step}))
    write(tmp_path / "checkpoint-300" / "model.safetensors")  # a crash mid-save
    source = CheckpointSource(str(tmp_path))
    found = source.resume_point()
    assert found.step == 200 and found.is_checkpoint and found.path.endswith("checkpoint-200")
    assert source.pending == {"checkpoint-300": 300}


def test_deleted_and_replaced_while_watched(tmp_path):
    d = Dir(tmp_path, "lightning")
    data = zip_bytes()
    write(d.path("epoch=0-step=10.ckpt"), data[:50])
    assert d.steps() == []
    os.unlink(d.path("epoch=0-step=10.ckpt"))
    assert d.steps() == []
    write(d.path("epoch=0-step=10.ckpt"), data)
    assert d.steps() == [10]
