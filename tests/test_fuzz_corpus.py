"""Replay the fuzzing corpus (fuzz/corpus/, grown by `make fuzz`) through the targets."""

from pathlib import Path

import pytest

from fuzz import targets

CORPUS = sorted((Path(__file__).resolve().parent.parent / "fuzz" / "corpus").iterdir())


def test_the_corpus_is_there():
    assert len(CORPUS) >= 5


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_input(path):
    targets.receive(path.read_bytes())
