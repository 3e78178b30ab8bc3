"""xdpml/obs/logs.py: text and JSON lines on stdout."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from xdpml.obs.logs import LoggingConfigError, setup_logging


@pytest.fixture(autouse=True)
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines():
    buf = io.StringIO()
    setup_logging("text", "info", stream=buf)
    log = logging.getLogger("agent.loader")
    log.debug("hidden")
    log.info("attached %s", "eth0", extra={"mode": "native", "note": "two words"})
    (line,) = buf.getvalue().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO  agent\.loader: attached eth0 "
        r'mode=native note="two words"',
        line,
    ), line


def test_json_lines_with_extras_and_exception():
    buf = io.StringIO()
    setup_logging("json", "debug", stream=buf)
    log = logging.getLogger("collector")
    log.debug("batch", extra={"rows": 512, "node": "n1"})
    try:
        raise RuntimeError("model server down")
    except RuntimeError:
        log.exception("scoring failed")
    first, second = (json.loads(ln) for ln in buf.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "msg", "rows", "node")} == {
        "level": "debug",
        "logger": "collector",
        "msg": "batch",
        "rows": 512,
        "node": "n1",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["level"] == "error" and second["msg"] == "scoring failed"
    assert "RuntimeError: model server down" in second["exc"]


def test_default_stream_is_stdout_and_second_call_replaces(capsys):
    setup_logging("text", "warning")
    setup_logging("json", "warning")  # replaces, never doubles
    logging.getLogger("x").warning("once")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and json.loads(out[0])["msg"] == "once"


def test_non_json_extra_does_not_break_the_line():
    buf = io.StringIO()
    setup_logging("json", "info", stream=buf)
    logging.getLogger("x").info("p", extra={"path": object()})
    assert json.loads(buf.getvalue())["path"].startswith("<object object")


@pytest.mark.parametrize(
    "fmt, level, message",
    [
        ("xml", "info", "log format must be one of text, json"),
        ("text", "verbose", "log level must be one of debug, info"),
    ],
)
def test_bad_arguments(fmt, level, message):
    with pytest.raises(LoggingConfigError, match=message):
        setup_logging(fmt, level)
