"""The real SmolLM2 on real text: cheap after the first conversion (~50 s once, cached)."""

import pytest
import torch
from flexcim.flow.eval import perplexity
from flexcim.flow.model import decoder_blocks, load_model
from flexcim.flow.text import load_corpus, token_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_smollm2_structure_text_and_perplexity(smollm2):
    blocks = decoder_blocks(smollm2.model)
    assert len(blocks) == 30 and sum(len(b.linears) for b in blocks) == 210
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert smollm2.tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
    corpus = load_corpus()
    assert "Elizabeth" in corpus.calibration and "Emma Woodhouse" in corpus.evaluation["emma"]
    windows = token_windows(smollm2.tokenizer, corpus.evaluation["held-out"], seq_len=64,
                            count=4, seed=0)
    with torch.no_grad():
        ppl = perplexity(smollm2.model, windows, progress=False)
    # Measured 40.6 on 16x128 held-out windows; short 64-token windows see less context.
    assert 15 < ppl < 120
