"""The stop sequence as a pure piece: a fake tree and a fake clock, so every
timing rule is checked exactly, without racing the machine."""

from __future__ import annotations

import signal

import pytest

from stopstep_cli.process import ProcInfo
from stopstep_cli.stop_sequence import KILL_SWEEP_LIMIT, Stage, StopSequence


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeTree:
    """Processes that obey (or not) the signals they get; a log of what was sent."""

    def __init__(self, members=(1000,), obeys=(signal.SIGINT,), command=1000, respawns=0):
        self.alive = set(members)
        self.obeys = set(obeys)
        self.command = command
        self.respawns = respawns  # a helper outside the group that forks this many times more
        self.sent = []

    def signal_group(self, signum):
        self.sent.append(("group", signal.Signals(signum).name))
        if signum in self.obeys or signum == signal.SIGKILL:
            self.alive.clear()
        return True

    def signal_outside_group(self, members, signum):
        self.sent.append(("outside", signal.Signals(signum).name))
        return 0

    def kill_all(self, members):
        self.sent.append(("kill_all", len(members)))
        self.alive.clear()
        if self.respawns:
            self.respawns -= 1
            self.alive.add(9000 + self.respawns)

    def live_members(self):
        return [ProcInfo(pid, 1, 1000, "S", 1, "p") for pid in sorted(self.alive)]

    def poll_exit(self):
        return None if self.command in self.alive else 130

    def quiet(self, now):
        return True


def advance_while(sequence, clock, stage):
    """Drive the sequence while it is in ``stage``; the clock time at which it left it."""
    while sequence.stage is stage:
        due = sequence.advance()
        if sequence.stage is not stage:
            return clock.now
        clock.now = max(clock.now, due)
    return clock.now


def run_until_idle(sequence, clock, limit=100000):
    for _ in range(limit):
        due = sequence.advance()
        if due is None:
            return
        clock.now = max(clock.now, due)
    raise AssertionError("the sequence never finished")


def test_signal_then_sigcont_at_once_and_done_when_the_tree_is_gone():
    clock, tree = Clock(), FakeTree()
    seq = StopSequence(tree, signal.SIGINT, 30, clock=clock)
    assert seq.begin()
    assert tree.sent == [("group", "SIGINT"), ("group", "SIGCONT")]  # sent by begin itself, no waiting
    run_until_idle(seq, clock)
    assert seq.stage is Stage.DONE and not seq.killed
    assert clock.now < 100.1


def test_sigkill_exactly_at_the_end_of_the_grace_period_counting_what_was_alive():
    clock, tree = Clock(), FakeTree(members=(1000, 1001, 1002), obeys=())
    said = []
    seq = StopSequence(tree, signal.SIGINT, 30, clock=clock, notify=said.append)
    seq.begin()
    assert advance_while(seq, clock, Stage.SIGNALLED) == pytest.approx(130.0)
    assert seq.killed and ("kill_all", 3) in tree.sent
    assert "killed 3 process(es) with SIGKILL" in said[-1]  # the count before the kill, not after
    run_until_idle(seq, clock)
    assert seq.stage is Stage.DONE


def test_a_second_begin_does_not_restart_the_grace_period():
    clock, tree = Clock(), FakeTree(obeys=())
    seq = StopSequence(tree, signal.SIGINT, 3, clock=clock)
    assert seq.begin(already_sent=signal.SIGTERM)
    clock.now += 2
    assert not seq.begin(already_sent=signal.SIGTERM)  # a second SIGTERM two thirds in
    assert advance_while(seq, clock, Stage.SIGNALLED) == pytest.approx(103.0)  # 3 s after the first, not 5
    assert tree.sent[0] == ("group", "SIGCONT")  # the received signal was passed on by the caller


def test_a_respawning_helper_is_swept_until_nothing_is_left():
    clock, tree = Clock(), FakeTree(obeys=(), respawns=5)
    seq = StopSequence(tree, signal.SIGINT, 1, clock=clock)
    seq.begin()
    run_until_idle(seq, clock)
    assert seq.stage is Stage.DONE
    assert sum(1 for entry in tree.sent if entry[0] == "kill_all") == 6


def test_sweeps_give_up_after_their_limit_and_say_who_is_left():
    class Unkillable(FakeTree):
        def kill_all(self, members):
            self.sent.append(("kill_all", len(members)))  # state D: SIGKILL does not take

    clock, tree = Clock(), Unkillable(obeys=())
    said = []
    seq = StopSequence(tree, signal.SIGINT, 1, clock=clock, notify=said.append)
    seq.begin()
    advance_while(seq, clock, Stage.SIGNALLED)
    assert advance_while(seq, clock, Stage.KILLING) == pytest.approx(101 + KILL_SWEEP_LIMIT)
    assert seq.stage is Stage.GAVE_UP
    assert "giving up" in said[-1] and "1000" in said[-1]


def test_leftovers_are_told_once_the_command_is_gone():
    class Leftovers(FakeTree):
        def signal_group(self, signum):
            self.sent.append(("group", signal.Signals(signum).name))
            self.alive.discard(self.command)  # the command obeys; the worker outside the group does not
            return True

    clock, tree = Clock(), Leftovers(members=(1000, 2000), obeys=())
    said = []
    seq = StopSequence(tree, signal.SIGINT, 5, clock=clock, notify=said.append)
    seq.begin()
    clock.now = seq.advance()
    seq.advance()
    assert ("outside", "SIGINT") in tree.sent
    assert any("outlived the command" in text for text in said)
    run_until_idle(seq, clock)
    assert [entry for entry in tree.sent if entry == ("outside", "SIGINT")] == [("outside", "SIGINT")]


def test_a_cooperative_window_comes_before_the_signal():
    clock, tree = Clock(), FakeTree()
    said = []
    seq = StopSequence(tree, signal.SIGINT, 10, clock=clock, notify=said.append)
    seq.begin(cooperative_window=10)
    assert tree.sent == [] and seq.stage is Stage.COOPERATIVE
    assert advance_while(seq, clock, Stage.COOPERATIVE) == pytest.approx(110.0)
    assert tree.sent[:2] == [("group", "SIGINT"), ("group", "SIGCONT")]
    assert "did not stop itself within 10s" in said[0]


def test_a_command_that_stops_itself_in_the_cooperative_window_gets_no_signal():
    clock, tree = Clock(), FakeTree()
    seq = StopSequence(tree, signal.SIGINT, 10, clock=clock)
    seq.begin(cooperative_window=10)
    clock.now += 1
    tree.alive.clear()
    run_until_idle(seq, clock)
    assert seq.stage is Stage.DONE and tree.sent == []


def test_without_a_process_table_the_command_exit_ends_it():
    class Blind(FakeTree):
        def live_members(self):
            return None

    clock, tree = Clock(), Blind()
    seq = StopSequence(tree, signal.SIGINT, 5, clock=clock)
    seq.begin()
    run_until_idle(seq, clock)
    assert seq.stage is Stage.DONE


def test_once_the_tree_is_down_the_writes_share_one_bound_and_the_report_has_its_own():
    import threading

    from stopstep_cli.sentinel import Sentinel

    made = []
    maker = threading.Thread(target=lambda: made.append(Sentinel([], write_limit=3.0)))  # off the main
    maker.start()  # thread: no signal handler is touched
    maker.join()
    sentinel = made[0]
    inf = float("inf")
    sentinel._finished_at = 100.0  # the tree came down at t=100
    # (token, deadline, what, seconds, kind, armed at)
    assert sentinel._deadline_of((1, inf, "the command's stderr", inf, "write", 99.0)) == 103.0
    assert sentinel._deadline_of((2, inf, "stopstep's message", inf, "write", 102.5)) == 103.0  # not 105.5
    assert sentinel._deadline_of((3, inf, "the report", inf, "report", 104.0)) == 107.0
    assert sentinel._deadline_of((4, 101.0, "hook X.end", 1.0, "hook", 100.5)) == 101.0  # its own timeout
    assert sentinel._deadline_of((5, 160.0, "hook X.end", 60.0, "hook", 99.0)) == 103.0
    sentinel._hook_cut_at = 103.0  # that hook was cut short: the messages it held back get their time
    assert sentinel._deadline_of((6, inf, "stopstep's message", inf, "write", 103.1)) == 106.0
    assert sentinel._deadline_of((7, inf, "the report", inf, "report", 105.0)) == 108.0
    sentinel.close()
