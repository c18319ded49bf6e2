"""The CLI: --help everywhere, and the commands that need no service."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
COMMANDS = ["services", "check", "index", "qu", "qu-train", "search", "feedback", "explain",
            "serve", "retrain", "worker", "beat", "templates", "templates list",
            "templates push", "templates render"]


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
