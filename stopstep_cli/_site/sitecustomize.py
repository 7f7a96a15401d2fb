"""stopstep's sitecustomize: load stopstep's in-process side, then the sitecustomize this one shadows.

``stopstep run`` puts this directory first on ``PYTHONPATH``, so Python's ``site``
imports this file as ``sitecustomize`` in every Python process of the command (the
way ``opentelemetry-instrument`` and ``ddtrace-run`` work). Only one module of that
name is ever imported, so this one then looks for the ``sitecustomize`` the
environment would have used and runs it, as ``sitecustomize``, as ``site`` would have.

Any Python may find this file on ``PYTHONPATH`` (even Python 2), so it uses no newer
syntax, imports nothing until it needs it, and lets no error of stopstep's escape.
"""

import sys


def _stopstep_install():
    if sys.version_info < (3, 9):
        return  # an older interpreter simply has no in-process side
    try:
        import _stopstep_inprocess

        _stopstep_inprocess.install()  # catches its own errors
    except Exception as exc:  # the module could not even be imported
        try:
            sys.stderr.write("stopstep: in-process stop disengaged: %r\n" % (exc,))
        except Exception:
            pass


def _stopstep_run_shadowed_sitecustomize():
    """Import the environment's own sitecustomize with this directory off ``sys.path``.

    Its own errors propagate, so ``site`` reports them exactly as it would have
    without stopstep."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    ours = []
    for index, entry in enumerate(sys.path):
        try:
            if os.path.abspath(entry or os.curdir) == here:
                ours.append((index, entry))
        except Exception:
            pass
    if not ours:
        return  # found some other way: looking again could find this very file
    for index, _ in reversed(ours):
        del sys.path[index]
    this_module = sys.modules.pop("sitecustomize", None)
    try:
        try:
            import sitecustomize  # noqa: F401  the environment's own, now that ours is off the path
        except ImportError as exc:
            if getattr(exc, "name", "sitecustomize") != "sitecustomize":
                raise  # the environment's sitecustomize is there and failed: site reports it
            if this_module is not None:
                sys.modules["sitecustomize"] = this_module  # there is none: this one stays
    finally:
        # Back where it was: children, introspection and the beacon see the same path.
        for index, entry in ours:
            sys.path.insert(index, entry)


_stopstep_install()
_stopstep_run_shadowed_sitecustomize()
