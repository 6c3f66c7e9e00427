"""flow.refit: the norm gains of a pruned model fitted to the dense model, nothing else moved."""

import copy

import pytest
import torch
from flexcim.flow.model import linear_layers
from flexcim.flow.refit import norm_parameters, refit_norms

from flexcim.errors import FlexCimError


def prune_24(model):
    """2:4 by magnitude along the input dimension, written independently of flow.prune."""
    with torch.no_grad():
        for lin in linear_layers(model).values():
            w = lin.weight.reshape(-1, 4)
            keep = w.abs().argsort(dim=1, descending=True)[:, :2]
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, keep, True)
            lin.weight.copy_((w * mask).reshape(lin.weight.shape))


def reference_kl(model, teacher, windows):
    """Mean KL(teacher || model) per token with torch's own kl_div."""
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=windows).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
    tokens = windows.numel()
    return float(torch.nn.functional.kl_div(q.reshape(tokens, -1), p.reshape(tokens, -1),
                                            log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("arch", ["tiny", "tiny_opt"])
def test_refit_lowers_the_kl_and_moves_only_the_norms(arch, request, tiny_windows):
    model = request.getfixturevalue(arch)
    teacher = copy.deepcopy(model)
    prune_24(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = norm_parameters(model)
    config = model.config
    layers = config.num_hidden_layers
    if arch == "tiny":  # RMSNorm: a gain per channel, two per block and the final one
        assert len(norms) == 2 * layers + 1
    else:  # OPT's LayerNorms: gain and bias, two per block and the decoder's final one
        assert len(norms) == 2 * (2 * layers + 1)
    before = reference_kl(model, teacher, tiny_windows)
    record = refit_norms(model, teacher, tiny_windows, epochs=4, lr=1e-2, batch=2,
                         progress=False)
    assert record["parameters"] == sum(p.numel() for p in norms.values())
    assert record["kl_before"] == pytest.approx(before, rel=1e-4)
    assert record["kl_after"] == pytest.approx(reference_kl(model, teacher, tiny_windows),
                                               rel=1e-4)
    assert record["kl_after"] < 0.9 * record["kl_before"]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])}
    assert moved and moved <= set(norms)  # only norm parameters changed, some of them
    for name, lin in linear_layers(model).items():  # the pruned weights bit for bit
        assert torch.equal(lin.weight, frozen[f"{name}.weight"]), name
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags as they were


def test_refit_refuses_a_model_without_norms_and_bad_settings(tiny, tiny_windows):
    with pytest.raises(FlexCimError, match="no RMSNorm or LayerNorm"):
        refit_norms(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), tiny_windows)
    with pytest.raises(FlexCimError, match="must be positive, not 0"):
        refit_norms(tiny, copy.deepcopy(tiny), tiny_windows, epochs=0)
