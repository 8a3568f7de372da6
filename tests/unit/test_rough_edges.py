"""Issue 14's rough edges that pure code shows: environment, YAML errors, logging."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from fdsupervisor.errors import ConfigErrors
from fdsupervisor.log import make_logger
from fdsupervisor.units import load_unit_text
from tests.unit.test_spawn import plan

ROOT = Path(__file__).resolve().parent.parent.parent


def test_no_listen_variables_without_a_passed_fd() -> None:
    # systemd's build_environment(): LISTEN_FDS / LISTEN_FDNAMES only when n_fds > 0
    env = dict(plan(passed=[], service={"exec": ("/bin/true",)}).environment)
    assert "LISTEN_FDS" not in env and "LISTEN_FDNAMES" not in env
    assert plan(passed=[], service={"exec": ("/bin/true",)}).pid_variables == ()


def test_unterminated_quote_names_where_it_was_opened(tmp_path: Path) -> None:
    text = 'sockets:\n  a:\n    listen: "127.0.0.1:0\n  b:\n    x: 1\nservice:\n  exec: [true]\n'
    with pytest.raises(ConfigErrors) as caught:
        load_unit_text(text, tmp_path / "q.yaml", tmp_path)
    message = str(caught.value)
    assert "opened at 3:13" in message, message


def test_errors_of_one_file_come_in_line_order(tmp_path: Path) -> None:
    text = (
        "sockets:\n  a:\n    listen: '127.0.0.1:0'\n    bogus: 1\n"
        "service:\n  bogus2: 2\n  exec: [true]\n  restart: foo\nzz: 1\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        load_unit_text(text, tmp_path / "o.yaml", tmp_path)
    lines = [e.location.line for e in caught.value.errors]
    assert len(lines) == 4 and lines == sorted(lines)


def test_journal_format_without_journald_falls_back_to_console(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = make_logger("journal", stream, journal_socket=str(tmp_path / "no-journald"))
    log.info("ready", units=1)
    out = stream.getvalue()
    assert "journal_unavailable" in out and "warning" in out
    assert "ready" in out  # the line is not lost


def test_readme_lists_upgrade_and_service_ready() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = readme[readme.index("Commands: `qmp_capabilities`") :]
    assert "`upgrade`" in commands.split("Events:")[0]
    assert "`SERVICE_READY`" in commands.split("Events:")[1].split("The reference")[0]


def test_readme_one_off_example_uses_the_venvs_python_and_says_where_tools_are() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "-- .venv/bin/python contrib/workers/echo.py" in readme
    assert "-- python3 contrib/workers/echo.py" not in readme
    assert ".venv/bin/qmp-shell" in readme
    assert "apt-get install netcat-openbsd socat" in readme
    assert (ROOT / ".venv" / "bin" / "qmp-shell").exists() or not (ROOT / ".venv").exists()


def test_json_log_unchanged_by_the_fallback() -> None:
    stream = io.StringIO()
    make_logger("json", stream).info("ready")
    assert json.loads(stream.getvalue())["event"] == "ready"
