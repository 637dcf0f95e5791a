"""Shared fixtures: one tiny demo corpus for the whole session (written in about a second)."""
import pytest

import demo_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return demo_corpus.write_demo_corpus(tmp_path_factory.mktemp("tiny"), demo_corpus.DemoConfig(train=48, dev=8, test=8,
                                                                                  talk_size=8, seed=3), verbose=False)
