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
def tiny_opt():
    """A tiny OPT (another architecture: out_proj/fc1/fc2 names, its own head)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, word_embed_proj_dim=32,
                       max_position_embeddings=64)
    return OPTForCausalLM(config).eval()


@pytest.fixture
def tokenizer():
    return CharTokenizer()


@pytest.fixture
def tiny_windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 96, (6, 16), generator=g)
