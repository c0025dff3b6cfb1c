"""Every Python example of README.md runs as written, at tiny sizes: the API example on a tiny
random local Llama in place of SmolLM2 (and 512 tokens in place of 2048), the kernel example
under the Triton interpreter at S = 200. Each substitution must find its text, so an edit of the
README that the test no longer covers fails here instead of going untested."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _substitute(code: str, old: str, new: str) -> str:
    assert old in code, f"README example no longer contains {old!r}: update this test"
    return code.replace(old, new)


def _run(code: str, name: str) -> None:
    exec(compile(code, f"README.md ({name})", "exec"), {"__name__": "__readme__"})


def test_readme_has_four_python_examples():
    examples = _examples()
    assert len(examples) == 4, "a new README example needs a test here"
    assert "SeerLlamaForCausalLM" in examples[0] and "block_sparse_attn_csr" in examples[1]
    assert "AutoSeerForCausalLM" in examples[2] and "GraphedDecoder" in examples[3]


def test_readme_decode_example_runs(tiny_llama_dir, capsys):
    code = _examples()[3].replace('"smollm2-135m"', repr(tiny_llama_dir))
    assert repr(tiny_llama_dir) in code, "README decode example no longer loads smollm2-135m: update this test"
    _run(code, "decode-stage sparsity")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 2


def test_readme_families_example_compiles():
    # it downloads five 7-8B models: only checked to be valid Python naming supported families here
    # (tests/models/test_families.py runs every family on tiny configs)
    code = _examples()[2]
    compile(code, "README.md (model families)", "exec")
    from seer_attn.models.modeling_seer import SEER_FAMILIES

    assert {"llama", "qwen2", "qwen3", "mistral", "phi3"} <= set(SEER_FAMILIES)


def test_readme_api_example_runs(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    code = _substitute(_examples()[0], '"smollm2-135m"', repr(tiny_llama_dir))
    code = _substitute(code, "else 2048", "else 512")
    monkeypatch.chdir(tmp_path)
    _run(code, "Python API")
    out = capsys.readouterr().out
    assert re.search(r"gate loss \d", out)
    density = float(re.search(r"realised block density ([0-9.]+)", out).group(1))
    assert 0 < density < 1
    assert re.search(r"dense PPL \d", out)
    saved = json.loads((tmp_path / "gates" / "config.json").read_text())
    assert saved["seerattn_mode"] == "sparse" and saved["seerattn_trained_mode"] == "distill"


def test_readme_kernel_example_runs(capsys):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or the Triton interpreter")
    code = _substitute(_examples()[1], "S, D = 1, 4, 2, 1000, 64", "S, D = 1, 4, 2, 200, 64")
    _run(code, "kernels")
    errors = dict(re.findall(r"(\w+): max \|kernel - twin\| = (\S+)", capsys.readouterr().out))
    assert set(errors) == {"attn_with_pooling", "block_sparse_attn_topk", "block_sparse_attn_csr"}
    tol = 1e-4 if not torch.cuda.is_available() else 1e-2
    assert all(float(e) <= tol for e in errors.values()), errors
