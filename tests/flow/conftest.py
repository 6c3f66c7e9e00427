import pytest
import torch
from flexcim.flow.model import tiny_llama


class CharTokenizer:
    """A tokenizer stand-in: one id per character (mod the tiny vocabulary)."""

    def __init__(self, vocab: int = 96):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % self.vocab for c in text]}


@pytest.fixture
def tiny():
    return tiny_llama(0)


@pytest.fixture
def tokenizer():
    return CharTokenizer()


@pytest.fixture
def tiny_windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 96, (6, 16), generator=g)
