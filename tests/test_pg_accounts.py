"""The PostgreSQL transport the way a data host and a web host run it: real
unix accounts, a cluster that authenticates them by peer (the role is the
account's name, no password anywhere), the configuration 'spoolops init
--transport postgresql --write-config' writes, the worker started by
setpriv as the worker account, clients as the web accounts.
"""

from __future__ import annotations

import json

import pytest
from support.accounts import MEMBER, OUTSIDER, WEB, WORKER, Deployment
from support.requires import unavailable

pytestmark = pytest.mark.accounts


@pytest.fixture(scope="module")
def peer_cluster(accounts):
    pytest.importorskip("psycopg")
    from spoolops.pgcluster import PgUnavailable, start_cluster
    try:
        # the test accounts reach the socket (its folder's group) and log in as
        # themselves; OUTSIDER too, so that the database (no role) refuses it
        cluster = start_cluster(peer=True, clients=(WORKER, WEB, MEMBER, OUTSIDER))
    except PgUnavailable as exc:
        unavailable(f"no PostgreSQL to test with: {exc}")
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def pg_deployment(accounts, peer_cluster):
    peer_cluster.psql("CREATE DATABASE accounts")
    dep = Deployment.create(accounts, access={"restricted": WEB},
                            pg=(peer_cluster, "accounts"))
    dep.start_worker()
    yield dep
    dep.close()


def test_web_account_calls_and_is_known_by_its_role(pg_deployment) -> None:
    config = pg_deployment.config_path.read_text()
    assert "transport = postgresql" in config and "durable = yes" in config
    assert "user=" not in config                     # peer: no role or password in the file
    reply = pg_deployment.call(WEB, "whoami")
    assert reply.code == 0, reply.stderr
    assert reply.reply["result"] == {"user": WEB} and reply.reply["submitted_by"] == WEB
    assert pg_deployment.call(WEB, "restricted").code == 0
    denied = pg_deployment.call(MEMBER, "restricted")
    assert denied.code == 1 and denied.reply["error"]["type"] == "PermissionDenied"


def test_one_web_account_cannot_read_anothers_reply(pg_deployment) -> None:
    done = pg_deployment.spoolops("call", "echo", "--arg", "secret=1", "--no-wait",
                                  user=WEB)
    assert done.returncode == 0, done.stderr
    rid = done.stdout.strip()
    peek = ("import sys, time\nfrom spoolops.client import Client\nc = Client()\n"
            "time.sleep(1.0)\nprint(repr(c.transport.collect(sys.argv[1], remove=False)))")
    other = pg_deployment.py(MEMBER, peek, rid)
    assert other.returncode == 0 and other.stdout.strip() == "None", other.stderr
    mine = pg_deployment.py(WEB, "import sys, json\nfrom spoolops.client import Client\n"
                            "print(json.dumps(Client().wait(sys.argv[1], 30).result))", rid)
    assert mine.returncode == 0 and json.loads(mine.stdout) == {"secret": "1"}, mine.stderr


def test_an_account_without_a_role_is_refused_clearly(pg_deployment) -> None:
    reply = pg_deployment.call(OUTSIDER, "echo")
    assert reply.code == 2 and OUTSIDER in reply.stderr, reply.stderr


def test_operator_views_as_root(pg_deployment) -> None:
    status = pg_deployment.spoolops("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["worker"]["alive"] is True
