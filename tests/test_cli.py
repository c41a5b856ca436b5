"""The spoolops command line against a real worker: output, JSON and exit codes.

The commands that act on a queue run on both transports (the ``queue`` /
``served`` fixtures: ``call`` as the web client, the others as the
operator); parsing, a bad configuration and ``init``'s tree need none
(``init`` over PostgreSQL: ``test_pg.py``)."""

from __future__ import annotations

import json
import os
import time

import pytest
from support.env import TRANSPORTS, SpoolEnv, queue_for
from support.waiting import wait_for

from spoolops.cli.main import build_parser, parse_call_args
from spoolops.config import ConfigError

SUBCOMMANDS = ["init", "worker", "call", "status", "show", "cancel", "requeue", "demo"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_for_each_subcommand(sub: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([sub, "--help"])
    assert info.value.code == 0
    assert "usage: spoolops " + sub in capsys.readouterr().out


def test_call_args_parsing() -> None:
    assert parse_call_args(["x:=1", "s=text", "night=20261128", 'j:={"a": [1]}', "e="],
                           None) == {"x": 1, "s": "text", "night": "20261128",
                                     "j": {"a": [1]}, "e": ""}
    assert parse_call_args(["x:=2"], '{"x": 1, "y": true}') == {"x": 2, "y": True}
    with pytest.raises(ConfigError):
        parse_call_args(["x:=not json"], None)
    with pytest.raises(ConfigError):
        parse_call_args(["novalue"], None)
    with pytest.raises(ConfigError):
        parse_call_args([], "[1, 2]")


def test_call_echo_prints_reply_and_exits_0(served) -> None:
    result = served.spoolops("call", "echo", "--arg", "x=1", user=served.web)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] is True and reply["result"] == {"x": "1"} and reply["op"] == "echo"


def test_config_after_subcommand(served) -> None:
    config = served.client_env()["SPOOLOPS_CONFIG"]
    result = served.spoolops("call", "echo", "--config", config, "--args-json", '{"y": 2}',
                             user=served.web)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == {"y": 2}


def test_call_failure_exits_1_usage_2(served) -> None:
    result = served.spoolops("call", "no_such_op", user=served.web)
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["type"] == "UnknownOp"
    assert served.spoolops("call", user=served.web).returncode == 2
    assert served.spoolops("call", "echo", "--arg", "broken", user=served.web).returncode == 2


def test_call_without_worker_exits_3(queue) -> None:
    t0 = time.monotonic()
    result = queue.spoolops("call", "echo", "--arg", "x=1", "--timeout", "1", user=queue.web)
    assert result.returncode == 3
    assert "no reply" in result.stderr
    assert time.monotonic() - t0 < 20
    assert queue.count("queued") == 0  # withdrawn


def test_bad_config_exits_2_naming_the_key(spool_env: SpoolEnv) -> None:
    bad = spool_env.base / "bad.conf"
    bad.write_text("[worker]\nconcurency = 3\n")
    result = spool_env.spoolops("--config", str(bad), "status")
    assert result.returncode == 2
    assert "unknown key [worker] concurency" in result.stderr


def test_status_json_matches_the_queue(queue) -> None:
    client = queue.client()
    ids = [client.submit("echo", {"n": n}) for n in range(3)]
    result = queue.spoolops("status", "--json")
    assert result.returncode == 1  # no worker: a problem
    status = json.loads(result.stdout)
    assert status["queued"]["count"] == 3 and status["queued"]["oldest_age_s"] >= 0
    assert status["running"] == {"count": 0, "oldest_age_s": None}
    assert status["failed"]["count"] == 0 and status["replies"]["count"] == 0
    assert status["worker"] == {"pid": None, "alive": False}
    assert any("no worker" in p for p in status["problems"]), status["problems"]
    proc = queue.start_worker()
    wait_for(lambda: queue.count("replies") == 3, what="replies")
    result = queue.spoolops("status", "--json")
    status = json.loads(result.stdout)
    assert result.returncode == 0, status["problems"]
    assert status["worker"]["alive"] is True and status["worker"]["pid"] == proc.pid
    assert status["replies"]["count"] == 3 and status["queued"]["count"] == 0
    text = queue.spoolops("status").stdout
    assert f"pid {proc.pid}" in text and queue.transport().place_of("replies") in text, text
    for rid in ids:
        client.wait(rid, timeout=10)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_status_reports_stuck_queue(request, tmp_path, kind: str) -> None:
    env = queue_for(request, tmp_path, kind, durable=False,
                    extra="[janitor]\nstuck_after = 1s\n")
    rid = env.client().submit("echo", {})
    env.set_queued_time(rid, time.time() - 10)      # queued ten seconds ago
    status = json.loads(env.spoolops("status", "--json").stdout)
    assert any("queued longer than stuck_after" in p for p in status["problems"]), status


def test_show_by_prefix_in_each_state(queue) -> None:
    client = queue.client()
    rid = client.submit("echo", {"shown": True})
    result = queue.spoolops("show", rid[:-3], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["id"] == rid and info["state"] == "queued"
    assert info["request"]["args"] == {"shown": True}
    queue.start_worker()
    wait_for(lambda: queue.count("replies") == 1, what="reply")
    info = json.loads(queue.spoolops("show", rid, "--json").stdout)
    assert info["state"] == "done" and info["reply"]["result"] == {"shown": True}
    text = queue.spoolops("show", rid).stdout
    assert "state:    done" in text and "outcome:  ok" in text and "timings:" in text
    missing = queue.spoolops("show", "no-such-id")
    assert missing.returncode == 1 and "no request matches" in missing.stderr


def test_show_ambiguous_prefix(queue) -> None:
    client = queue.client()
    ids = [client.submit("echo", {}), client.submit("echo", {})]
    prefix = os.path.commonprefix(ids)
    assert prefix and prefix not in ids
    result = queue.spoolops("show", prefix)
    assert result.returncode == 1 and "matches 2 requests" in result.stderr, result.stderr


def test_cancel_and_requeue_exit_codes(queue) -> None:
    client = queue.client()
    rid = client.submit("echo", {})
    result = queue.spoolops("cancel", rid)
    assert result.returncode == 0 and "cancelled" in result.stdout
    # run by the operator (the worker's side), cancel answers a waiter
    reply = client.wait(rid, timeout=10)
    assert reply.error["type"] == "Cancelled"
    assert queue.spoolops("cancel", rid).returncode == 1
    assert queue.spoolops("requeue", rid).returncode == 1


def test_init_is_idempotent_and_writes_config(spool_env: SpoolEnv) -> None:
    out = spool_env.base / "written.conf"
    result = spool_env.spoolops("init", "--write-config", str(out))
    assert result.returncode == 0, result.stderr
    assert "created" not in result.stdout  # nothing to do the second time
    assert "[spool]" in out.read_text()
    again = spool_env.spoolops("--config", str(out), "status", "--json")
    assert json.loads(again.stdout)["root"] == str(spool_env.config.root)
