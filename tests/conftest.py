import os

import pytest

from aether.core.log import show_messages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def library_messages():
    """The library's messages shown on stdout, as every command shows them (tests read them there)."""
    show_messages()
