"""Stop a training loop of your own at exactly stopstep's target step.

::

    from stopstep_cli import beacon

    for batch in data:
        loss = train_step(batch)
        step += 1
        if beacon.step(step, loss=loss):  # after each finished step
            break

Under ``stopstep run`` each call reports the step (and its values) to stopstep and
returns True once the loop should stop after this step: the target is reached, or
stopstep decided to stop (time limit, NaN loss, a signal) and announced the step to
stop after. Outside stopstep it does nothing and returns False. It never blocks.

This delegates to stopstep's in-process module (``_stopstep_inprocess``, which
``stopstep run`` puts on the command's path), so the beacon and the framework
integrations share one connection and one stop decision per process. When that
module is not on the path but stopstep's channel is in the environment (``python
-S``, or a launcher that rebuilt ``PYTHONPATH``), the copy shipped with this package
is loaded instead.
"""

import os
import sys

_MODULE = "_stopstep_inprocess"
_CHANNEL_ENV = "STOPSTEP_INPROC_CHANNEL"


def step(step, **values):
    """Report that global step ``step`` finished, with values such as ``loss=0.25``
    (numbers and strings; a one-element CPU tensor or numpy scalar becomes a float, a
    tensor on an accelerator is left out rather than waited for). Returns True when
    the loop should stop after this step."""
    return _implementation(step, values)


def _outside(step, values):
    return False


def _first_call(step, values):
    global _implementation
    _implementation = _find_implementation()
    return _implementation(step, values)


_implementation = _first_call


def _find_implementation():
    module = sys.modules.get(_MODULE)
    if module is None:
        if not os.environ.get(_CHANNEL_ENV):
            return _outside
        module = _load_module()
        if module is None:
            return _outside
    prepare = getattr(module, "prepare", None)
    if prepare is not None:
        try:
            prepare()
        except Exception:
            pass  # engaging will say what is wrong, once
    return module.beacon_step


def _load_module():
    """The in-process module: the one on the path (the supervisor's own copy), else ours."""
    try:
        import _stopstep_inprocess

        return _stopstep_inprocess
    except ImportError:
        pass
    try:
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site", _MODULE + ".py")
        spec = importlib.util.spec_from_file_location(_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE] = module  # one state per process, whoever imports it next
        spec.loader.exec_module(module)
        return module
    except Exception as exc:
        sys.modules.pop(_MODULE, None)
        try:
            sys.stderr.write("stopstep: in-process stop disengaged: beacon: %r\n" % (exc,))
        except Exception:
            pass
        return None


if os.environ.get(_CHANNEL_ENV):
    # Found now, on the importing thread: see _stopstep_inprocess.prepare.
    _implementation = _find_implementation()
