"""InMemorySaver passes the contract every saver must pass, over both of its APIs."""

import os

import pytest

from stepgraph.checkpoint.memory import InMemorySaver
from stepgraph.checkpoint.serde import EncryptedSerializer
from stepgraph.checkpoint.testing import AsyncSaverContract, SaverContract


class TestInMemorySaver(SaverContract):
    @pytest.fixture
    def saver(self) -> InMemorySaver:
        return InMemorySaver()


class TestAsyncInMemorySaver(AsyncSaverContract):
    @pytest.fixture
    def saver(self) -> InMemorySaver:
        return InMemorySaver()


class TestEncryptedInMemorySaver(SaverContract):
    """The contract holds whatever the serializer, e.g. one that encrypts every row."""

    @pytest.fixture
    def saver(self) -> InMemorySaver:
        return InMemorySaver(serde=EncryptedSerializer(key=os.urandom(32)))
