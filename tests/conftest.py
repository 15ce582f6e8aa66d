import logging
import os

import pytest

from aether.core.log import LOGGER, show_messages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def library_messages():
    """The library's messages shown on stdout, as every command shows them (tests read them there)."""
    show_messages()


@pytest.fixture(autouse=True)
def library_messages_stay_shown():
    """A test that silences the library's logger (as `logging.config` does to loggers that exist)
    would empty the output every later test in its process reads: fail there instead."""
    yield
    loggers = logging.Logger.manager.loggerDict
    silenced = [n for n, lg in loggers.items() if n.split(".")[0] == LOGGER and getattr(lg, "disabled", False)]
    assert not silenced and logging.getLogger(LOGGER).level == logging.INFO, f"this test silenced {silenced}"
