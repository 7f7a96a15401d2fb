"""The in-process side stays out of the way: another sitecustomize still runs, launchers that close
descriptors do not matter, it can be turned off, errors disengage it with one line and training goes
on, and processes without the channel (or under ``python -S``) are untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from inprocess_support import (
    DISENGAGED,
    HF_TRAIN,
    ROOT,
    STANDINS,
    child_env,
    run_to_end,
    script,
    site_only_env,
)

from stopstep_cli.channel import SITE_DIR, InProcessChannel


@pytest.fixture
def channel():
    with InProcessChannel() as channel:
        yield channel


def assert_trained_to_the_end(run, output_dir: Path):
    """The HF stand-in ran all its 20 steps, untouched: what it does without stopstep."""
    assert run.proc.returncode == 0, run.stderr
    assert b"train returned at 20" in run.stdout
    assert sorted(os.listdir(output_dir)) == ["checkpoint-20"]


def test_the_environments_own_sitecustomize_still_runs(channel, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIR_SITECUSTOMIZE'] = __file__\n")
    code = HF_TRAIN + """
    import os, sitecustomize
    print("theirs ran:", os.environ.get("THEIR_SITECUSTOMIZE") == sitecustomize.__file__, flush=True)
    print("site dir still first:", sys.path.index(os.environ["SITE"]) < sys.path.index(os.environ["THEIRS"]))
    """
    env = child_env(channel, 5, {"SITE": SITE_DIR, "THEIRS": str(theirs)}, path=(theirs, STANDINS, ROOT))
    run = run_to_end(script(code) + [str(tmp_path / "out")], env, channel)

    assert run.proc.returncode == 0, run.stderr
    assert b"train returned at 5" in run.stdout  # ours ran
    assert b"theirs ran: True" in run.stdout  # and theirs, as module sitecustomize
    assert b"site dir still first: True" in run.stdout


@pytest.mark.parametrize("broken", ["raise RuntimeError('theirs is broken')", "import no_such_module_of_theirs"])
def test_an_error_in_their_sitecustomize_is_reported_as_python_would(channel, tmp_path, broken):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text(broken + "\n")
    env = child_env(channel, 3, path=(theirs, STANDINS, ROOT))
    run = run_to_end(script(HF_TRAIN) + [str(tmp_path / "out")], env, channel)

    without_stopstep = subprocess.run([sys.executable, "-c", "pass"], capture_output=True,
                                      env=child_env(None, None, path=(theirs,)))
    assert b"Error in sitecustomize" in without_stopstep.stderr
    assert run.stderr == without_stopstep.stderr
    assert b"train returned at 3" in run.stdout  # ours was installed before theirs ran


def test_a_launcher_that_closes_inherited_descriptors_does_not_matter(channel, tmp_path):
    launcher = """
        import os, sys
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # what torchrun and subprocess(close_fds=True) do
        os.execv(sys.executable, [sys.executable] + sys.argv[1:])
    """
    train = script(HF_TRAIN)[1:] + [str(tmp_path)]
    run = run_to_end(script(launcher) + train, child_env(channel, 4), channel)

    assert run.proc.returncode == 0, run.stderr
    assert b"train returned at 4" in run.stdout
    assert os.listdir(tmp_path) == ["checkpoint-4"]
    assert [m["pid"] for m in run.of_type("hello")] == [run.proc.pid]  # the exec'd trainer, same pid


def test_disabled_by_the_environment(channel, tmp_path):
    code = HF_TRAIN + """
    from stopstep_cli import beacon
    print("beacon says stop:", beacon.step(10**9), flush=True)
    """
    run = run_to_end(script(code) + [str(tmp_path)], child_env(channel, 4, {"STOPSTEP_INPROC_DISABLE": "1"}), channel)

    assert_trained_to_the_end(run, tmp_path)
    assert b"beacon says stop: False" in run.stdout
    assert run.stderr == b""
    assert run.messages == [] and not channel.engaged


def test_unreachable_supervisor_disengages_with_one_line_and_training_goes_on(tmp_path):
    env = child_env(None, None, {"STOPSTEP_INPROC_CHANNEL": str(tmp_path / "gone"), "STOPSTEP_INPROC_TARGET": "4"})
    env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, env["PYTHONPATH"]])
    run = run_to_end(script(HF_TRAIN) + [str(tmp_path / "out")], env)

    assert_trained_to_the_end(run, tmp_path / "out")
    (line,) = run.stderr_lines()
    assert line.startswith(DISENGAGED + "hf: RuntimeError('cannot reach the supervisor at ")


def test_an_error_in_a_framework_integration_disengages_and_fit_goes_on(channel):
    # A Keras whose optimizer has no `iterations` (a version stopstep does not know): the callback
    # fails at its first batch end; fit must run all its epochs as if stopstep were not there.
    code = """
        import keras
        class Unknown:  # an optimizer without `iterations`
            def apply(self):
                pass
        model = keras.Model()
        model.compile(optimizer=Unknown())
        model.train_step = lambda step: {"loss": 0.5}
        history = model.fit(epochs=3, steps_per_epoch=4)
        print("epochs", history.epoch, flush=True)
    """
    run = run_to_end(script(code), child_env(channel, 2), channel)

    assert run.proc.returncode == 0, run.stderr
    assert run.stdout.strip() == b"epochs [0, 1, 2]"
    (line,) = run.stderr_lines()  # once, though every batch end came back
    assert line.startswith(DISENGAGED + "keras: AttributeError(") and "'iterations'" in line
    assert [m["t"] for m in run.messages] == ["hello"]  # on_train_begin engaged, then nothing


def test_a_bad_step_is_ignored_with_one_line_and_the_stop_stays_on(channel):
    code = """
        from stopstep_cli import beacon
        print(beacon.step(1), beacon.step(object()), beacon.step(None), beacon.step(float("nan")),
              [beacon.step(s) for s in (2, 3, 10**9)], flush=True)
    """
    run = run_to_end(script(code), child_env(channel, 5), channel)

    assert run.proc.returncode == 0
    assert run.stdout.strip() == b"False False False False [False, False, True]"
    (line,) = run.stderr_lines()  # one line for the three bad calls
    assert line.startswith("stopstep: beacon: step <object object at") and "is not a whole number" in line
    assert [m["t"] for m in run.messages][-1] == "stopping"


def test_a_malformed_target_disengages_at_start_with_one_line(channel, tmp_path):
    run = run_to_end(script(HF_TRAIN) + [str(tmp_path)], child_env(channel, None, {"STOPSTEP_INPROC_TARGET": "5k"}),
                     channel)

    assert_trained_to_the_end(run, tmp_path)
    (line,) = run.stderr_lines()
    assert line.startswith(DISENGAGED + "install: ValueError(")
    assert run.messages == []


def test_a_process_without_the_channel_is_untouched(tmp_path):
    code = HF_TRAIN + """
    import _stopstep_inprocess
    from transformers.trainer import Trainer
    from stopstep_cli import beacon
    print("hooked:", any(type(f).__module__ == "_stopstep_inprocess" for f in sys.meta_path),
          "patched:", hasattr(Trainer.__init__, "_stopstep_patched"),
          "beacon:", beacon.step(10**9), flush=True)
    """
    run = run_to_end(script(code) + [str(tmp_path)], site_only_env())

    assert_trained_to_the_end(run, tmp_path)
    assert b"hooked: False patched: False beacon: False" in run.stdout
    assert run.stderr == b""


def test_python_dash_S_has_no_in_process_side(channel, tmp_path):
    code = HF_TRAIN + """
    print("loaded:", "_stopstep_inprocess" in sys.modules, flush=True)
    """
    argv = script(code)
    run = run_to_end([argv[0], "-S"] + argv[1:] + [str(tmp_path)], child_env(channel, 4), channel)

    assert_trained_to_the_end(run, tmp_path)
    assert b"loaded: False" in run.stdout
    assert run.messages == []


def test_startup_imports_nothing_heavy(channel):
    # sitecustomize runs in every Python process under stopstep: the channel's modules come only
    # when a process engages.
    code = """
        import sys
        heavy = ("json", "socket", "select", "threading", "_stopstep_frameworks", "_stopstep_inprocess")
        print(sorted(m for m in heavy if m in sys.modules))
    """
    run = run_to_end(script(code), child_env(channel, 4), channel)

    assert run.stdout.strip() == b"['_stopstep_inprocess']"
    assert run.messages == []


def test_a_framework_imported_before_install_is_hooked_too(channel, tmp_path):
    # -S: no sitecustomize, so the framework comes first and install() finds it already imported.
    code = HF_TRAIN.replace("from transformers import Trainer, TrainingArguments", """
    from transformers import Trainer, TrainingArguments
    import _stopstep_inprocess
    _stopstep_inprocess.install()""")
    argv = script(code)
    run = run_to_end([argv[0], "-S"] + argv[1:] + [str(tmp_path)], child_env(channel, 4), channel)

    assert run.proc.returncode == 0, run.stderr
    assert b"train returned at 4" in run.stdout


def _interpreters():
    """Other Pythons on this machine, as (name, path): the versions the site directory must serve.
    None of them has stopstep, click, psutil or watchdog installed."""
    found = []
    roots = [Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"]
    for version in ("2.7", "3.8", "3.9", "3.10", "3.12", "3.13"):
        for root in roots:
            for candidate in sorted(root.glob(f"{version}.*/bin/python{version}")):
                found.append(pytest.param(candidate, id=f"python{version}"))
                break
    base = getattr(sys, "_base_executable", None)
    if base and os.path.realpath(base) != os.path.realpath(sys.executable):
        found.append(pytest.param(Path(base), id="base-interpreter"))
    return found or [pytest.param(None, marks=pytest.mark.skip("no other Python interpreter on this machine"))]


@pytest.mark.parametrize("python", _interpreters())
def test_other_interpreters_without_stopstep_installed(channel, tmp_path, python):
    probe = subprocess.run([str(python), "-c", "import sys; print(sys.version_info >= (3, 9))"],
                           capture_output=True, env=site_only_env())
    has_side = probe.stdout.strip() == b"True"
    # only the site directory and the stand-ins on the path: not this checkout, so no stopstep_cli
    env = child_env(channel, 4, path=(STANDINS,))
    no_stopstep = subprocess.run([str(python), "-c", "import stopstep_cli.cli"], capture_output=True, env=env,
                                 cwd=tmp_path)
    assert no_stopstep.returncode != 0

    if not has_side:  # Python 2.7 / 3.8: no in-process side, and no noise either
        code = "import sys, sitecustomize; print('%s %s' % (sitecustomize.__name__, '_stopstep_inprocess' in sys.modules))"
        run = run_to_end([str(python), "-c", code], env, channel, cwd=tmp_path)
        assert (run.proc.returncode, run.stdout.split(), run.stderr) == (0, [b"sitecustomize", b"False"], b"")
        assert run.messages == []
        return
    hf_train = script(HF_TRAIN)[1:]
    run = run_to_end([str(python)] + hf_train + [str(tmp_path / "out")], env, channel, cwd=tmp_path)
    assert run.proc.returncode == 0, run.stderr
    assert run.stderr == b""
    assert b"train returned at 4" in run.stdout
    assert [m["t"] for m in run.messages][-1] == "stopping"
    # a loop of its own: the supervisor lends its beacon where no stopstep_cli is installed
    code = "from stopstep_cli import beacon\nprint([beacon.step(s) for s in (3, 4)])"
    run = run_to_end([str(python), "-c", code], env, channel, cwd=tmp_path)
    assert (run.proc.returncode, run.stdout.strip(), run.stderr) == (0, b"[False, True]", b"")
