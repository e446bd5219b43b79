"""Shared fixtures: offline tokenizers for tests that need text, not a Hub download.

Under pytest-xdist (the README's `-n 2`) each worker process gets one torch thread, and so do
the processes tests start: two workers on two cores, not four threads fighting over them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast



def word_tokenizer(
    texts: Sequence[str], *, bos: bool = True, eos: bool = True
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (words and punctuation) whose vocabulary is every token of `texts`.

    Ids: <unk>=0, <s>=1, </s>=2, then the words; `bos`/`eos` say whether the tokenizer declares
    those special tokens. It never adds special tokens to its inputs.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    declared = {"unk_token": "<unk>"}
    if bos:
        declared["bos_token"] = "<s>"
    if eos:
        declared["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **declared)


@pytest.fixture(scope="session")
def make_word_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """`word_tokenizer` as a fixture: call it with the texts the test uses."""
    return word_tokenizer


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A calibration text file for the command line: one sentence, repeated."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(" ".join(["the module returns a new object for each class and function"] * 200))
    return path
