"""PUSHGATE_EVENT_LOOP picks the dataplane's and the Linux client's event loop."""

import asyncio
import importlib.util

import pytest

from pushgate_io.event_loop import EVENT_LOOP_ENVIRONMENT, loop_factory


def test_asyncio_is_the_default_and_a_typo_is_refused(monkeypatch):
    monkeypatch.delenv(EVENT_LOOP_ENVIRONMENT, raising=False)
    assert loop_factory() is None
    assert loop_factory(asyncio.SelectorEventLoop) is asyncio.SelectorEventLoop
    monkeypatch.setenv(EVENT_LOOP_ENVIRONMENT, "asyncio")
    assert loop_factory() is None
    monkeypatch.setenv(EVENT_LOOP_ENVIRONMENT, "uv-loop")
    with pytest.raises(SystemExit, match="'uv-loop': expected asyncio or uvloop"):
        loop_factory()


def test_uvloop_when_asked_for_or_a_clear_error(monkeypatch):
    monkeypatch.setenv(EVENT_LOOP_ENVIRONMENT, "uvloop")
    if importlib.util.find_spec("uvloop") is None:
        with pytest.raises(SystemExit, match="uvloop is not installed"):
            loop_factory()
        return
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        assert type(runner.get_loop()).__module__.startswith("uvloop")
