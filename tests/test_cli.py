"""The spoolops command line against a real worker: output, JSON and exit codes."""

from __future__ import annotations

import json
import os
import time

import pytest
from support.env import SpoolEnv, make_spool_env
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


def test_call_echo_prints_reply_and_exits_0(running: SpoolEnv) -> None:
    result = running.spoolops("call", "echo", "--arg", "x=1")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] is True and reply["result"] == {"x": "1"} and reply["op"] == "echo"


def test_config_after_subcommand(running: SpoolEnv) -> None:
    result = running.spoolops("call", "echo", "--config", str(running.config_path),
                              "--args-json", '{"y": 2}')
    assert result.returncode == 0 and json.loads(result.stdout)["result"] == {"y": 2}


def test_call_failure_exits_1_usage_2(running: SpoolEnv) -> None:
    result = running.spoolops("call", "no_such_op")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["type"] == "UnknownOp"
    assert running.spoolops("call").returncode == 2
    assert running.spoolops("call", "echo", "--arg", "broken").returncode == 2


def test_call_without_worker_exits_3(spool_env: SpoolEnv) -> None:
    t0 = time.monotonic()
    result = spool_env.spoolops("call", "echo", "--arg", "x=1", "--timeout", "1")
    assert result.returncode == 3
    assert "no reply" in result.stderr
    assert time.monotonic() - t0 < 20
    assert list(spool_env.spool.new.iterdir()) == []  # withdrawn


def test_bad_config_exits_2_naming_the_key(spool_env: SpoolEnv) -> None:
    bad = spool_env.base / "bad.conf"
    bad.write_text("[worker]\nconcurency = 3\n")
    result = spool_env.spoolops("--config", str(bad), "status")
    assert result.returncode == 2
    assert "unknown key [worker] concurency" in result.stderr


def test_status_json_matches_spool(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    ids = [client.submit("echo", {"n": n}) for n in range(3)]
    result = spool_env.spoolops("status", "--json")
    assert result.returncode == 1  # no worker: a problem
    status = json.loads(result.stdout)
    assert status["queued"]["count"] == 3 and status["queued"]["oldest_age_s"] >= 0
    assert status["running"] == {"count": 0, "oldest_age_s": None}
    assert status["failed"]["count"] == 0 and status["replies"]["count"] == 0
    assert status["worker"] == {"pid": None, "alive": False}
    assert any("no worker" in p for p in status["problems"])
    proc = spool_env.start_worker()
    wait_for(lambda: len(list(spool_env.spool.replies.iterdir())) == 3, what="replies")
    result = spool_env.spoolops("status", "--json")
    status = json.loads(result.stdout)
    assert result.returncode == 0, status["problems"]
    assert status["worker"]["alive"] is True and status["worker"]["pid"] == proc.pid
    assert status["replies"]["count"] == 3 and status["queued"]["count"] == 0
    text = spool_env.spoolops("status").stdout
    assert f"pid {proc.pid}" in text and "replies/" in text
    for rid in ids:
        client.wait(rid, timeout=10)


def test_status_reports_stuck_queue(tmp_path) -> None:
    env = make_spool_env(tmp_path / "t", durable=False,
                         extra="[janitor]\nstuck_after = 1s\n")
    try:
        rid = env.client().submit("echo", {})
        past = time.time() - 10                     # queued ten seconds ago
        os.utime(env.spool.new / f"{rid}.json", (past, past))
        status = json.loads(env.spoolops("status", "--json").stdout)
        assert any("queued longer than stuck_after" in p for p in status["problems"])
    finally:
        env.close()


def test_show_by_prefix_in_each_state(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    rid = client.submit("echo", {"shown": True})
    result = spool_env.spoolops("show", rid[:-3], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["id"] == rid and info["state"] == "queued"
    assert info["request"]["args"] == {"shown": True}
    spool_env.start_worker()
    wait_for(lambda: (spool_env.spool.replies / f"{rid}.json").exists(), what="reply")
    info = json.loads(spool_env.spoolops("show", rid, "--json").stdout)
    assert info["state"] == "done" and info["reply"]["result"] == {"shown": True}
    text = spool_env.spoolops("show", rid).stdout
    assert "state:    done" in text and "outcome:  ok" in text and "timings:" in text
    missing = spool_env.spoolops("show", "no-such-id")
    assert missing.returncode == 1 and "no request matches" in missing.stderr


def test_show_ambiguous_prefix(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    client.submit("echo", {})
    client.submit("echo", {})
    result = spool_env.spoolops("show", "2")
    assert result.returncode == 1 and "matches 2 requests" in result.stderr


def test_cancel_and_requeue_exit_codes(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    rid = client.submit("echo", {})
    result = spool_env.spoolops("cancel", rid)
    assert result.returncode == 0 and "cancelled" in result.stdout
    # run by the worker user (here: the test user owns the tree), cancel answers a waiter
    reply = client.wait(rid, timeout=10)
    assert reply.error["type"] == "Cancelled"
    assert spool_env.spoolops("cancel", rid).returncode == 1
    assert spool_env.spoolops("requeue", rid).returncode == 1


def test_init_is_idempotent_and_writes_config(spool_env: SpoolEnv) -> None:
    out = spool_env.base / "written.conf"
    result = spool_env.spoolops("init", "--write-config", str(out))
    assert result.returncode == 0, result.stderr
    assert "created" not in result.stdout  # nothing to do the second time
    assert "[spool]" in out.read_text()
    again = spool_env.spoolops("--config", str(out), "status", "--json")
    assert json.loads(again.stdout)["root"] == str(spool_env.config.root)
