"""The CLI: --help everywhere, and the commands that need no service."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
COMMANDS = ["services", "check", "index", "qu", "qu-train", "search", "feedback", "explain",
            "serve", "retrain", "worker", "beat", "templates", "templates list",
            "templates push", "templates render", "spool", "simulate", "evaluate",
            "evaluate ope", "evaluate beir"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    res = runner.invoke(app, [*command.split(), "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_templates_render_is_json_and_keeps_injection_as_data():
    res = runner.invoke(app, ["templates", "render", "lexical", '"}},{"match_all":{}'])
    assert res.exit_code == 0, res.output
    body = json.loads(res.output)
    assert body["query"]["bool"]["should"][0]["multi_match"]["query"] == '"}},{"match_all":{}'


def test_qu_prints_slots_and_intent():
    res = runner.invoke(app, ["qu", "happy 80s pop", "--json"])
    assert res.exit_code == 0, res.output
    pq = json.loads(res.output)
    assert pq["intent"] == "browse"
    assert {(s["category"], s["value"]) for s in pq["slots"]} >= {
        ("mood", "happy"), ("era", "1980s"), ("genre", "pop")}


def test_retrain_without_now_does_nothing():
    res = runner.invoke(app, ["retrain"])
    assert res.exit_code == 2 and "--now" in res.output


def test_serve_with_workers_binds_a_tcp_socket(monkeypatch):
    """uvicorn < 0.55 binds --workers N sockets with protocol 0, so asyncio skips TCP_NODELAY
    on accepted connections (+40 ms per keep-alive response); `ltrr serve` re-creates such a
    socket as IPPROTO_TCP. uvicorn 0.55 binds IPPROTO_TCP itself (checked below), so the old
    behaviour is reproduced with a bind that returns a protocol-0 socket."""
    import socket

    from uvicorn.config import Config

    from orchestrator.cli import _tcp_nodelay_for_worker_sockets

    config = Config(app="orchestrator.api:create_app", host="127.0.0.1", port=0, workers=2)
    plain = config.bind_socket()
    assert plain.proto in (0, socket.IPPROTO_TCP)  # 0 before uvicorn 0.55
    plain.close()

    def bind_proto0(self: Config) -> socket.socket:  # what uvicorn < 0.55 returned
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
        sock.bind((self.host, self.port))
        return sock

    monkeypatch.setattr(Config, "bind_socket", bind_proto0)  # restored after the test
    old = config.bind_socket()
    assert old.proto == 0
    old.close()
    _tcp_nodelay_for_worker_sockets()
    _tcp_nodelay_for_worker_sockets()  # idempotent
    sock = config.bind_socket()
    try:
        assert sock.proto == socket.IPPROTO_TCP
        sock.listen()
        client = socket.create_connection(sock.getsockname()[:2])
        conn, _ = sock.accept()
        assert conn.proto == socket.IPPROTO_TCP  # what asyncio checks before setting NODELAY
        conn.close()
        client.close()
    finally:
        sock.close()


def test_spool_status_counts_waiting_records(tmp_path):
    from orchestrator.resilience import spool_key
    from orchestrator.settings import OrchestratorSettings

    s = OrchestratorSettings()
    name = f"spool-{spool_key(s.redis.url, s.redis.key_prefix)}-1-abc.jsonl"
    (tmp_path / name).write_text('{"kind": "apply", "payload": {}}\n' * 2, encoding="utf-8")
    (tmp_path / "spool-otherkey0000-1-abc.jsonl").write_text('{"kind": "apply"}\n')  # not ours
    res = runner.invoke(app, ["spool", "status", "--spool-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "1 spool file(s), 2 record(s)" in res.output
    bad = runner.invoke(app, ["spool", "drop", "--spool-dir", str(tmp_path)])
    assert bad.exit_code != 0 and "status | replay" in bad.output
