import pytest
from flexcim.flow import model as fm
from torch import nn

from flexcim.errors import FlexCimError


def test_tiny_llama_blocks_and_linears(tiny):
    blocks = fm.decoder_blocks(tiny)
    assert [b.index for b in blocks] == [0, 1, 2, 3]
    assert list(blocks[1].linears) == [
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                        "mlp.down_proj")
    ]
    linears = fm.linear_layers(tiny)
    assert len(linears) == 28 and "lm_head" not in linears
    assert linears["model.layers.3.mlp.down_proj"] is tiny.model.layers[3].mlp.down_proj


def test_model_without_linears_is_rejected():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(FlexCimError, match="NoLinear: decoder block layers.0 has no torch"):
        fm.decoder_blocks(NoLinear())
    with pytest.raises(FlexCimError, match="unsupported model architecture Sequential"):
        fm.decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_bad_model_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXCIM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FlexCimError, match="does not exist"):
        fm.load_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"1234")
    with pytest.raises(FlexCimError, match="neither a model directory nor a .gguf"):
        fm.load_model(tmp_path / "weights.bin")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FlexCimError, match="cannot read GGUF model"):
        fm.load_model(tmp_path / "broken.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlexCimError, match="has no config.json"):
        fm.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(FlexCimError, match="cannot load model"):
        fm.load_model(tmp_path / "empty")


def test_hf_directory_round_trip(tiny, tmp_path):
    """A saved HF directory loads back through the same entry point (needs a tokenizer)."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(65 + i): i for i in range(26)} | {"[UNK]": 26}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "[UNK]")))
    tiny.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = fm.load_model(tmp_path / "m")
    assert len(fm.decoder_blocks(loaded.model)) == 4
    for name, layer in fm.linear_layers(loaded.model).items():
        assert (layer.weight == fm.linear_layers(tiny)[name].weight).all()


def test_run_until_stops_once_every_module_is_reached(tiny_windows):
    import torch

    model = fm.tiny_llama(0)
    fm.untie_lm_head(model)
    blocks = fm.decoder_blocks(model)
    calls = []
    after = model.lm_head.register_forward_hook(lambda *_: calls.append("head"))
    late = blocks[-1].module.register_forward_hook(lambda *_: calls.append("last block"))
    try:
        # given out of call order: the pass stops at the later one, each gets its own input
        head, second = fm.run_until(model, tiny_windows, [model.lm_head, blocks[1].module])
        assert calls == ["last block"]  # the head never ran
        calls.clear()
        first, = fm.run_until(model, tiny_windows, [blocks[1].module])
        assert calls == []  # stopped before the last block
    finally:
        after.remove()
        late.remove()
    with torch.no_grad():
        out = model.model(input_ids=tiny_windows, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(head[0][0], out.last_hidden_state)
    torch.testing.assert_close(second[0][0], out.hidden_states[1])
    torch.testing.assert_close(first[0][0], out.hidden_states[1])
    assert not model.lm_head._forward_pre_hooks and not blocks[1].module._forward_pre_hooks
    # a module the pass never calls: None, and the pass runs to its end
    stray = nn.Linear(2, 2)
    assert fm.run_until(model, tiny_windows[:1], [stray]) == [None]
