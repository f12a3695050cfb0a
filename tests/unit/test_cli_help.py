"""Every command's help is complete and in one style: arguments as NAME, help on every option."""

from __future__ import annotations

import re

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

from bastion.gateway.cli import app


def commands(command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    found = [(path, command)]
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            found += commands(sub, (*path, name))
    return found


def test_every_option_has_help_and_every_argument_is_shown_upper_case() -> None:
    problems = []
    tree = commands(typer.main.get_command(app))
    assert len(tree) > 25  # the walk really reached the subcommands
    for path, command in tree:
        where = " ".join(("bastion", *path))
        if not (command.help or "").strip():
            problems.append(f"{where}: no help")
        for param in command.params:
            if isinstance(param, TyperArgument) and not (param.metavar or "").isupper():
                problems.append(f"{where} {param.name}: shown as {param.metavar or param.name}")
            if isinstance(param, TyperOption) and not (param.help or "").strip():
                problems.append(f"{where} --{param.name}: no help")
        shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output
        if "``" in shown or "<bool>" in shown or re.search(r"\{[a-z_]+\}", shown):
            problems.append(f"{where}: help shows ``, <bool> or a {{name}}")
    assert not problems, "\n".join(problems)


def test_admin_errors_speak_cli_words() -> None:
    from bastion.gateway.cli_incidents import cli_words

    assert cli_words("400: invalid request: query.status: Input should be 'a'") == (
        "400: invalid request: --status: Input should be 'a'"
    )
    assert cli_words("400: body.older_than_s: bad").startswith("400: --older-than-s")
    assert cli_words("400: invalid request: path.key: too short") == (
        "400: invalid request: KEY: too short"  # a path parameter is the command's argument
    )
    refused = cli_words("403: this action needs 'Authorization: Bearer <admin token>'")
    assert refused.endswith("(pass --token, or set BASTION_ADMIN_TOKEN)")


def test_without_a_token_the_cli_sends_no_authorization_header() -> None:
    """No token given: no ``Bearer`` header, so the server says a token is needed rather
    than that the (empty) token is wrong."""
    import http.server
    import threading

    from bastion.gateway.admin_client import call

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the stdlib calls it by this name
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"127.0.0.1:{server.server_port}"
    try:
        call(url, "", "GET", "/v2/admin/keys")
        call(url, "s3cret", "GET", "/v2/admin/keys")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [None, "Bearer s3cret"]
