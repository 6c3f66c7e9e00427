import math

import pytest
import torch
from flexcim.flow import eval as fe
from flexcim.flow.eval import perplexity
from flexcim.flow.model import next_call_cache
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


def _loop_nll(model, row, first: int) -> list[float]:
    """The reference: every prediction of tokens ``first .. L-1`` from one full-window call."""
    logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), dim=-1)
    return [-float(logp[t - 1, row[t]]) for t in range(first, len(row))]


@pytest.mark.parametrize("prefill", [1, 6, 15])
def test_continuation_of_a_dense_model_is_the_full_window_loss(tiny, tiny_windows, prefill):
    with torch.no_grad():
        nll = [v for row in tiny_windows for v in _loop_nll(tiny, row, prefill)]
    expected = math.exp(sum(nll) / len(nll))
    for batch_size in (1, 4):
        got = perplexity(tiny, tiny_windows, batch_size=batch_size, progress=False,
                         prefill=prefill)
        assert got == pytest.approx(expected, rel=1e-5)
    # a different set of tokens than the whole window's (the first prediction dropped)
    whole = perplexity(tiny, tiny_windows, progress=False)
    assert prefill == 1 or abs(got / whole - 1) > 1e-4


def _stepwise_ppl(model, ids, prefill: int) -> float:
    """The reference: the prompt in one call, then every later token as a one-token decode step
    on the KV cache (as a server runs them), the loss by hand."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        logits = [out.logits[:, -1]]
        for pos in range(prefill, ids.shape[1] - 1):
            out = model(input_ids=ids[:, pos : pos + 1], use_cache=True,
                        **next_call_cache(model, out))
            logits.append(out.logits[:, -1])
    logits = torch.stack(logits, 1).double()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, prefill:, None]).mean()
    return math.exp(float(nll))


@pytest.mark.parametrize("arch", ["tiny", "tiny_opt"])
def test_continuation_prunes_the_prompt_and_decodes_densely(request, tiny_windows, arch):
    from flexcim.flow.act import PROJECTIONS, ActConfig, activation_pruning

    tiny = request.getfixturevalue(arch)  # OPT: past_key_values, its MLP input flattened
    prefill, ids = 6, tiny_windows
    config = ActConfig(pattern="1:4", projections=PROJECTIONS)
    with activation_pruning(tiny, config):
        expected = _stepwise_ppl(tiny, ids, prefill)
        for batch_size in (1, 4):
            got = perplexity(tiny, ids, batch_size=batch_size, progress=False, prefill=prefill)
            assert got == pytest.approx(expected, rel=1e-5)
        # every token pruned (one full-window call), scored on the same tokens: not what ran
        with torch.no_grad():
            every = [v for row in ids for v in _loop_nll(tiny, row, prefill)]
    dense = perplexity(tiny, ids, progress=False, prefill=prefill)
    # 10x beyond the agreement above (OPT, 2 blocks: 5e-4 from the all-pruned figure)
    assert abs(got / dense - 1) > 1e-4  # the prompt was pruned
    assert abs(got / math.exp(sum(every) / len(every)) - 1) > 1e-4  # the decode was not


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_continuation_in_w8a8_equals_one_token_steps(tiny, tiny_windows, monkeypatch,
                                                     granularity):
    """The teacher-forced decode call quantizes as the one-token steps do: a scale per token
    (with ``tensor`` granularity too: one token is the whole tensor of a served step)."""
    from flexcim.flow import quant
    from flexcim.flow.act import PROJECTIONS, ActConfig, activation_pruning

    prefill, ids = 5, tiny_windows
    config = quant.W8A8Config(act_granularity=granularity)

    pruning = ActConfig("1:4", projections=PROJECTIONS)

    def run() -> tuple[float, float]:
        with quant.w8a8(tiny, config), activation_pruning(tiny, pruning):
            return (_stepwise_ppl(tiny, ids, prefill),
                    perplexity(tiny, ids, progress=False, prefill=prefill))

    expected, got = run()
    assert got == pytest.approx(expected, rel=2e-6)  # measured 1-2e-7: float rounding
    assert abs(got / perplexity(tiny, ids, progress=False, prefill=prefill) - 1) > 1e-3
    if granularity == "tensor":  # without the decode rule: scales over the call's tokens
        monkeypatch.setattr(quant, "continues_cache", lambda kwargs: False)
        stepwise, batched = run()
        assert stepwise == pytest.approx(expected, rel=1e-6)  # one token: the same scales
        assert abs(batched / expected - 1) > 2e-5  # measured 7e-5


@pytest.mark.parametrize("prefill", [0, 16, -1])
def test_bad_prefill(tiny, tiny_windows, prefill):
    with pytest.raises(FlexCimError, match=f"prefill tokens must be in 1..15 for windows of 16 "
                                           f"tokens, not {prefill}"):
        perplexity(tiny, tiny_windows, progress=False, prefill=prefill)
