"""Shared test setup.

- Triton kernels run under the interpreter (``TRITON_INTERPRET=1``) when no GPU is present, so CI
  on CPU exercises the real kernels on small shapes. This must happen before triton is imported.
- ``torch.empty`` called from inside ``seer_attn`` returns NaN-filled floating tensors, so a kernel
  that leaves part of its output unwritten fails loudly instead of passing on leftover memory.
- ``@pytest.mark.gpu`` tests are skipped when CUDA is not available, and only then.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import inspect  # noqa: E402

import pytest  # noqa: E402


def _patch_triton_language_once_per_launch() -> None:
    """Interpreter speed: triton 3.9 re-patches `triton.language` on every call of a `@triton.jit` helper
    inside an interpreted kernel, though the launch has patched the same modules for its whole run (a
    helper's patch is never undone: once one has patched a module, later ones write the values already
    there). That was about a third of the kernel tests' time (11.8 of 35.8 s in one `kv_blocks_from_mask`
    test). Here a helper skips it while a launch runs whose patch, or an earlier helper's, covers the
    helper's `triton.language` modules; the helper's body runs exactly as before. Interpreter internals
    other than expected leave everything as it is.
    """
    try:
        from triton.runtime import interpreter as itp
    except Exception:
        return
    needed = (hasattr(itp, "GridExecutor") and hasattr(itp, "InterpretedFunction") and hasattr(itp, "InterpreterError")
              and hasattr(itp.InterpretedFunction, "rewrite") and hasattr(itp, "tl"))  # fmt: skip
    if not needed:
        return
    lang_mods = (itp.tl, itp.tl.core)
    running: list[frozenset] = []

    def langs(fn) -> frozenset:
        return frozenset(id(v) for v in getattr(fn, "__globals__", {}).values() if inspect.ismodule(v) and v in lang_mods)

    launch, helper = itp.GridExecutor.__call__, itp.InterpretedFunction.__call__

    def launch_call(self, *args, **kwargs):
        running.append(langs(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            running.pop()

    def helper_call(self, *args, **kwargs):
        mine = langs(self.fn)
        if not running or not mine <= running[-1]:
            if running:  # e.g. triton's own jit'd library (tl.sum, tl.cdiv) sees triton.language.core
                running[-1] = running[-1] | mine
            return helper(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise itp.InterpreterError(repr(e)) from e

    itp.GridExecutor.__call__ = launch_call
    itp.InterpretedFunction.__call__ = helper_call


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_language_once_per_launch()

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _called_from_seer_attn() -> bool:
    frame = inspect.currentframe()
    try:
        f = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        name = f.f_globals.get("__name__", "") if f is not None else ""
        return name.startswith("seer_attn")
    finally:
        del frame


def _nan_fill(t):
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t


def _poisoned_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    return _nan_fill(t) if _called_from_seer_attn() else t


def _poisoned_empty_like(*args, **kwargs):
    t = _real_empty_like(*args, **kwargs)
    return _nan_fill(t) if _called_from_seer_attn() else t


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped only when none is present)")
    config.addinivalue_line("markers", "slow: real-model tests (SmolLM2); still part of the default suite")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def eval_text() -> str:
    """Real English text present on every Python install (the pydoc topics)."""
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics.values())


SMALL_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. "
    "def f(x):\n    return x * 2 + 1\n\nfor i in range(10):\n    print(f(i))\n"
)


def _make_tiny_llama_dir(path):
    """A random 2-layer Llama with a 300-token byte-level BPE tokenizer, saved as a local HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SMALL_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Path of a local tiny random Llama folder (model + tokenizer), built once per session."""
    return str(_make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_text_jsonl(tmp_path_factory):
    """A local .jsonl of 12 short documents (a few hundred tokens each with the tiny tokenizer)."""
    import json

    path = tmp_path_factory.mktemp("tiny_data") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": f"Document {i}. " + SMALL_TEXT * (1 + i % 3)}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    """`(model, tokenizer)`: the embedded SmolLM2-135M, loaded once per session (about 25 s on CPU).

    Tests that use it must set every `seerattn_*` field they depend on (`set_seerattn`), since the
    model is shared.
    """
    from seer_attn import SeerLlamaForCausalLM, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = SeerLlamaForCausalLM.from_pretrained("smollm2-135m", seerattn_mode="dense").eval()
    return model, tokenizer
