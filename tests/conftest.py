"""Shared fixtures: one tiny demo corpus for the whole session (written in about a second)."""
import pytest

import data


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return data.write_demo_corpus(tmp_path_factory.mktemp("tiny"), data.DemoConfig(train=48, dev=8, test=8,
                                                                                  talk_size=8, seed=3), verbose=False)
