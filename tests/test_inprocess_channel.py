"""The supervisor's end of the channel on its own: environment, parsing, senders, announcements, cleanup.
The processes are plain sockets in the test, shaped like the in-process client's."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from stopstep_cli.channel import SITE_DIR, InProcessChannel, parse_message, stop_step_ahead
from stopstep_cli.observation import IN_PROCESS


@pytest.fixture
def channel():
    with InProcessChannel() as channel:
        yield channel


def client(channel):
    """A socket as a training process opens it: autobound, connected, non-blocking."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    sock.bind("")
    sock.connect(channel.path)
    return sock


def send(sock, message):
    sock.send(json.dumps(message).encode() if isinstance(message, dict) else message)


def hello(pid=100, rank=0, fw="hf", step=0):
    return {"t": "hello", "proto": 1, "pid": pid, "rank": rank, "world": 1, "fw": fw, "step": step, "target": 9}


def received(sock):
    messages = []
    while True:
        try:
            messages.append(json.loads(sock.recv(65536)))
        except BlockingIOError:
            return messages


def test_environment_puts_the_site_directory_first_and_keeps_the_rest(channel):
    env = channel.environment(500, {"PYTHONPATH": os.pathsep.join(["/a", SITE_DIR, "/b"])})
    assert env == {"PYTHONPATH": os.pathsep.join([SITE_DIR, "/a", "/b"]),
                   "STOPSTEP_INPROC_CHANNEL": channel.path, "STOPSTEP_INPROC_TARGET": "500"}
    assert channel.environment(None, {})["PYTHONPATH"] == SITE_DIR
    # a target not known yet overrides one inherited from an outer stopstep
    assert channel.environment(None, {"STOPSTEP_INPROC_TARGET": "7"})["STOPSTEP_INPROC_TARGET"] == ""
    assert os.path.isfile(os.path.join(SITE_DIR, "sitecustomize.py"))


def test_socket_lives_in_a_private_directory_removed_on_close():
    channel = InProcessChannel()
    directory = os.path.dirname(channel.path)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(channel.path).st_mode)
    channel.close()
    channel.close()
    assert not os.path.exists(directory)


def test_receive_never_blocks_and_parses_what_came(channel):
    nothing = []
    waiting = threading.Thread(target=lambda: nothing.append(channel.receive()), daemon=True)
    waiting.start()
    waiting.join(timeout=10)
    assert nothing == [[]], "receive() waited for a datagram"
    sock = client(channel)
    send(sock, hello())
    send(sock, {"t": "step", "pid": 100, "rank": 0, "step": 1, "v": {"loss": 0.5}})
    send(sock, b'{"t":"step","pid":100,"rank":0,"step":2,"v":{"loss":NaN}}')

    messages = channel.receive()
    assert [m["t"] for m in messages] == ["hello", "step", "step"]
    assert messages[1]["v"] == {"loss": 0.5} and messages[2]["v"]["loss"] != messages[2]["v"]["loss"]
    assert channel.engaged and channel.frameworks == {"hf"}
    (sender,) = channel.senders.values()
    assert (sender.pid, sender.rank, sender.start_step, sender.last_step) == (100, 0, 0, 2)
    assert channel.receive() == []


def test_receive_takes_at_most_max_messages(channel):
    sock = client(channel)
    for step in range(1, 6):
        send(sock, {"t": "step", "pid": 1, "rank": 0, "step": step})
    assert [m["step"] for m in channel.receive(max_messages=2)] == [1, 2]
    assert [m["step"] for m in channel.receive()] == [3, 4, 5]


MALFORMED = {
    "not-json": b"not json",
    "not-utf8": b"\xff\xfe",
    "not-an-object": b"[1, 2]",
    "no-step": b'{"t": "step", "pid": 1, "rank": 0}',
    "step-a-string": b'{"t": "step", "pid": 1, "rank": 0, "step": "7"}',
    "step-a-bool": b'{"t": "step", "pid": 1, "rank": 0, "step": true}',
    "values-not-an-object": b'{"t": "step", "pid": 1, "rank": 0, "step": 7, "v": [0.5]}',
    "skipped-not-a-number": b'{"t": "step", "pid": 1, "rank": 0, "step": 7, "skipped": "x"}',
    "hello-without-framework": b'{"t": "hello", "pid": 1, "rank": 0, "step": 0}',
    "pid-a-string": b'{"t": "hello", "pid": "1", "rank": 0, "fw": "hf", "step": 0}',
    "unknown-type": b'{"t": "something new", "pid": 1, "rank": 0, "step": 5}',
}


@pytest.mark.parametrize("datagram", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_datagrams_are_counted_and_left_out(channel, datagram):
    sock = client(channel)
    send(sock, datagram)
    send(sock, {"t": "step", "pid": 1, "rank": 0, "step": 3})
    assert [m["step"] for m in channel.receive()] == [3]
    assert channel.malformed == 1


def test_values_that_are_not_numbers_or_strings_are_left_out():
    message = parse_message(b'{"t":"step","pid":1,"rank":0,"step":4,"v":{"loss":0.5,"bad":[1],"ok":"x","n":null}}')
    assert message["v"] == {"loss": 0.5, "ok": "x"}


def test_announcements_reach_every_process_that_reported(channel):
    first, second = client(channel), client(channel)
    send(first, hello(pid=1, rank=0))
    send(second, hello(pid=2, rank=1))
    channel.receive()

    channel.announce_target(40)
    channel.announce_stop(30, "time_limit")
    channel.announce_stop(35, "signal")  # later than the one announced: changes nothing
    expected = [{"t": "target", "step": 40}, {"t": "stop_at", "step": 30, "reason": "time_limit"}]
    assert received(first)[-2:] == expected
    assert received(second)[-2:] == expected


def test_a_late_joiner_gets_what_was_announced_before_it(channel):
    channel.announce_stop(12, "nan_loss")
    sock = client(channel)
    send(sock, hello())
    channel.receive()
    assert received(sock) == [{"t": "stop_at", "step": 12, "reason": "nan_loss"}]


def test_nothing_is_sent_before_anything_is_announced(channel):
    sock = client(channel)
    send(sock, hello())
    channel.receive()
    assert received(sock) == []


def test_announcing_to_a_process_that_is_gone_forgets_it(channel):
    sock = client(channel)
    send(sock, hello())
    channel.receive()
    sock.close()

    channel.announce_stop(5, "signal")  # no error
    assert channel.senders == {}


def test_an_announcement_that_found_a_full_queue_is_sent_again(channel):
    sock = client(channel)
    send(sock, hello())
    channel.receive()
    queued = 0
    while True:  # the process is busy: its queue fills up
        try:
            channel._sock.sendto(b"{}", sock.getsockname())
            queued += 1
        except BlockingIOError:
            break
    channel.announce_stop(8, "time_limit")
    assert {"t": "stop_at", "step": 8, "reason": "time_limit"} not in received(sock)  # dropped, and the queue drained

    channel.receive()  # the next round sends it again
    assert received(sock) == [{"t": "stop_at", "step": 8, "reason": "time_limit"}]
    assert queued > 0


def test_step_and_stopping_messages_become_observations(channel):
    step = {"t": "step", "pid": 1, "rank": 2, "step": 10, "skipped": 4, "v": {"loss": 0.25}}
    observation = channel.to_observation(step)
    assert (observation.step, observation.fields, observation.source, observation.kind, observation.coalesced) == (
        10, {"loss": 0.25}, "in-process:rank2", IN_PROCESS, 4)
    assert observation.time > 0
    assert channel.to_observation({"t": "stopping", "pid": 1, "rank": 0, "step": 11, "why": "target"}).step == 11
    assert channel.to_observation(hello()) is None


def test_a_stop_step_ahead_covers_a_quarter_second_and_lands_on_a_grid():
    assert stop_step_ahead(0, None) == 2  # nothing known of the rate: two steps
    assert stop_step_ahead(92, 41.8) == 112  # a margin of 11 steps, on a grid of 16
    assert stop_step_ahead(93, 41.8) == 112  # a node that saw one step more picks the same step
    assert stop_step_ahead(10_000, 10_000.0) == 16_384  # 2,500 steps ahead, on a grid of 4,096
    for highest in range(0, 200):
        for rate in (0.5, 3.0, 41.8, 333.0):
            stop_at = stop_step_ahead(highest, rate)
            margin = max(2, -(-rate * 0.25 // 1))
            assert highest + margin <= stop_at < highest + 3 * margin, (highest, rate, stop_at)
    # two nodes one step apart agree far more often than not
    agree = sum(stop_step_ahead(h, 41.8) == stop_step_ahead(h + 1, 41.8) for h in range(1600))
    assert agree == 1500
