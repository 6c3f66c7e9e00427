import math

import pytest
import torch
from flexcim.flow import eval as fe
from flexcim.flow.eval import perplexity
from torch import nn

from flexcim.errors import FlexCimError


class Uniform(nn.Module):
    """Equal logits over V tokens: the perplexity of any text is exactly V."""

    def forward(self, input_ids, **kwargs):
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


def _logits_nll(model, batch) -> float:
    """The summed next-token loss from the model's own logits (the reference)."""
    with torch.no_grad():
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].double()
    return float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             batch[:, 1:].reshape(-1), reduction="sum"))


@pytest.mark.parametrize("chunk", [7, 96, 2048])  # chunks that do not divide V = 96, one, all
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_loss_equals_the_logits_loss(tiny, tiny_opt, tiny_windows, monkeypatch,
                                                  chunk, bias):
    monkeypatch.setattr(fe, "VOCAB_CHUNK", chunk)
    for model in (tiny, tiny_opt):
        head = model.get_output_embeddings()
        if bias:
            head.bias = nn.Parameter(torch.randn(head.out_features))
        assert fe._plain_head(model) is head
        expected = _logits_nll(model, tiny_windows)
        assert fe.nll_sum(model, tiny_windows) == pytest.approx(expected, rel=1e-5)
        # the head is left as it was: no hook stays behind
        assert not head._forward_pre_hooks
        assert _logits_nll(model, tiny_windows) == expected


def test_other_heads_use_the_model_logits(tiny, tiny_windows, monkeypatch):
    """A model type not known to end in a plain head (soft-capping, scaling) keeps its logits."""
    expected = _logits_nll(tiny, tiny_windows)
    monkeypatch.setattr(tiny.config, "model_type", "gemma2")
    assert fe._plain_head(tiny) is None
    calls = []
    tiny.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    assert fe.nll_sum(tiny, tiny_windows) == pytest.approx(expected, rel=1e-6)
    assert calls == [1]  # the head ran in full
