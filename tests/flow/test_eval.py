import math

import pytest
import torch
from flexcim.flow.eval import perplexity
from torch import nn

from flexcim.errors import FlexCimError


class Uniform(nn.Module):
    """Equal logits over V tokens: the perplexity of any text is exactly V."""

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 37)})()


def test_uniform_model_has_perplexity_vocab():
    w = torch.randint(0, 37, (5, 9))
    assert perplexity(Uniform(), w, progress=False) == pytest.approx(37.0, rel=1e-6)


def test_perplexity_matches_a_per_token_loop_and_ignores_batching(tiny, tiny_windows):
    nll = []
    with torch.no_grad():
        for row in tiny_windows:
            logp = torch.log_softmax(tiny(input_ids=row[None]).logits[0], dim=-1)
            nll += [-float(logp[t, row[t + 1]]) for t in range(len(row) - 1)]
    expected = math.exp(sum(nll) / len(nll))
    for batch_size in (1, 4, 6):
        got = perplexity(tiny, tiny_windows, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)


def test_bad_windows():
    with pytest.raises(FlexCimError, match="windows must be"):
        perplexity(Uniform(), torch.zeros(4, 1, dtype=torch.long), progress=False)
