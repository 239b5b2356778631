"""Model versions of ``tao serve``: which weights answer, a reload from a model directory, a rollback.

A model version is a model directory in Hugging Face layout (``config.json`` and ``*.safetensors``, as
``tao run`` writes ``final/`` and its round models) and a version string. Every request is admitted
under one version and runs on its weights to the end; its logged exchange names that version
(``model_version`` and ``policy_version``), and its response's ``system_fingerprint`` is ``tao-<version>``.

Python API, for code in the server's process (the flywheel), awaited on the server's event loop; the
routes of :mod:`tao_core.serve.admin` call the same methods::

    versions = app.state.tao.versions  # a ModelVersions
    await versions.reload("runs/demo/final")  # {"version": "1", "previous": "0", "model": "/abs/runs/demo/final"}
    await versions.reload("runs/demo/rounds/3", version="r3")
    await versions.rollback()  # {"version": "1", "previous": "r3", "model": "/abs/runs/demo/final"}
    versions.current, versions.model_dir, versions.history  # the served version, its directory, [Version]

:meth:`ModelVersions.reload` reads the directory's weights in a worker thread (no request waits on the
disk), checks that they fit the served model (:func:`read_weights`), hands them to the engine loop
(:class:`~tao_core.serve.engine_loop.Swap`) and returns once requests admitted from then on get the new
version; requests in flight finish on the old weights. Without ``version`` the new one is named by the
next integer when every version so far is an integer ("0", "1", ...), else by the directory's name.
:meth:`ModelVersions.rollback` serves the version before the current one again, read again from its
directory (only the path is kept), and forgets the current one: rolling back twice goes back two.

Errors: :class:`VersionError` (status 400: the directory, its weights or the version name; 409: nothing to
roll back to) and :class:`~tao_core.serve.engine_loop.Closed` (the server is shutting down). A call that
fails changes nothing: the served version, its weights and the history stay as they were.

Calls are serialized: a reload or rollback waits for the one before it, and for that one's swap to
settle (its last request on the old weights to finish), so at most two copies of the weights exist.
A caller that stops waiting (a cancelled task, a client gone) does not stop the swap it started.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tao_core.errors import TaoInputError
from tao_core.serve.engine_loop import EngineLoop, Swap
from tao_core.serve.exchange import Exchanges
from tao_core.serve.safetensors_file import SafetensorsFile
from tao_core.serve.threads import start_passing

# config fields that change what a forward computes beyond the parameters' names and shapes
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
               "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias",
               "mlp_bias", "max_position_embeddings", "sliding_window", "use_sliding_window")
MAX_VERSION_CHARS = 128
FIT_HINT = "reload a model of the served architecture (e.g. a round or final model of a run that started from it)"


class VersionError(TaoInputError):
    """A reload or rollback refused: ``status`` is its HTTP status (400 or 409), ``param`` the field at
    fault ("model", "version" or None). Nothing changed."""

    def __init__(self, status: int, message: str, param: str | None = "model") -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Version:
    version: str  # the name written to every exchange it answers
    model_dir: Path  # where its weights are read from (absolute)


class ModelVersions:
    """The served model version and its history; see the module docstring."""

    def __init__(self, loop: EngineLoop, model: torch.nn.Module, *, version: str, model_dir: Path,
                 exchanges: Exchanges) -> None:
        self._loop = loop
        self._model = model
        self._exchanges = exchanges
        self.history = [Version(version, Path(model_dir).resolve())]  # the served one last
        self._names = {version: self.history[0].model_dir}  # every version served, with its directory
        self._lock = asyncio.Lock()
        self._settled: Any = None  # the last swap's `settled` future (concurrent.futures.Future)
        loop.weights.name(version)

    @property
    def current(self) -> str:
        """The version requests admitted now get."""
        return self.history[-1].version

    @property
    def model_dir(self) -> Path:
        return self.history[-1].model_dir

    async def reload(self, model_dir: str | Path, version: str | None = None) -> dict[str, str]:
        """Serve the weights in ``model_dir`` as ``version``: ``{"version", "previous", "model"}``."""
        return await _detached(self._reload(model_dir, version))

    async def rollback(self) -> dict[str, str]:
        """Serve the version before the current one again: ``{"version", "previous", "model"}``."""
        return await _detached(self._rollback())

    async def _reload(self, model_dir: str | Path, version: str | None) -> dict[str, str]:
        if not isinstance(model_dir, str | Path) or not str(model_dir):
            raise VersionError(400, f"model must be the path of a model directory, got {model_dir!r}")
        try:
            path = Path(model_dir).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long, a NUL, a lone surrogate
            why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e)[:200]}"
            raise VersionError(400, f"model {str(model_dir)[:200]!r}: not a usable directory path ({why})") from None
        async with self._lock:
            await self._wait_settled()
            name = self._name(version, path)
            previous = self.current
            await self._swap(name, path)
            self.history.append(Version(name, path))
            self._names[name] = path
            return {"version": name, "previous": previous, "model": str(path)}

    async def _rollback(self) -> dict[str, str]:
        async with self._lock:
            await self._wait_settled()
            if len(self.history) < 2:
                raise VersionError(409, f"no version to roll back to: {self.current!r} ({self.model_dir}) is the "
                               "first this server served; reload a model directory instead", param=None)
            target, previous = self.history[-2], self.current
            await self._swap(target.version, target.model_dir)
            self.history.pop()
            return {"version": target.version, "previous": previous, "model": str(target.model_dir)}

    async def _wait_settled(self) -> None:
        if self._settled is not None:
            await asyncio.wrap_future(self._settled)
            self._settled = None

    async def _swap(self, name: str, path: Path) -> None:
        """Read ``path``'s weights off the event loop and make them version ``name`` for new requests."""
        try:
            reading = start_passing(read_weights, self._model, path, name="tao-read-weights")  # tao_core.serve.threads
            tensors = await asyncio.wrap_future(reading)
        except OSError as e:  # a directory it may not list, a file it may not stat
            raise VersionError(400, f"{str(path)[:300]}: cannot read it ({e.strerror or e})") from None
        swap = Swap(name, tensors)
        self._loop.swap(swap)
        await asyncio.wrap_future(swap.applied)
        self._settled = swap.settled
        self._exchanges.model_version = name  # requests the engine never admits are logged under it

    def _name(self, version: str | None, path: Path) -> str:
        if version is None:
            if all(v.isdigit() for v in self._names):
                return str(max(int(v) for v in self._names) + 1)
            name, k = path.name or "model", 2
            while name in self._names:
                name, k = f"{path.name}-{k}", k + 1
            return name
        if not isinstance(version, str) or not version.strip() or len(version) > MAX_VERSION_CHARS \
                or not version.isprintable():
            raise VersionError(400, f"version must be a non-empty printable string of at most {MAX_VERSION_CHARS} "
                               f"characters, got {version!r}", param="version")
        if version == self.current:
            raise VersionError(400, f"version {version!r} is the one served; name the new weights with another version",
                               param="version")
        named = self._names.get(version)
        if named is not None and named != path:
            raise VersionError(400, f"version {version!r} already named the weights in {named}; give the weights in "
                               f"{path} a version of their own", param="version")
        return version


async def _detached(work: Coroutine[Any, Any, dict[str, str]]) -> dict[str, str]:
    """Await ``work`` in a task of its own: a caller that stops waiting does not interrupt a swap."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # the caller who gave up has no use for it; not "never retrieved"


# reading a version's weights (in a worker thread) ---------------------------------------------------

def read_weights(model: torch.nn.Module, model_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` read from ``model_dir``'s safetensors, each tensor laid out like the
    parameter (device, dtype, strides); :class:`VersionError` naming what does not fit.

    Names and shapes must be the served model's, and the config's architecture fields (:data:`ARCH_FIELDS`)
    the same; floating-point tensors are cast to the served dtype, as ``tao serve --dtype`` casts the model
    it starts with. A parameter tied to another (an embedding shared with the LM head) is read under either
    name; names of the model's buffers (rotary tables) are skipped.
    """
    if not model_dir.is_dir():
        raise VersionError(400, f"{model_dir}: no such model directory; give a directory in Hugging Face layout "
                           "(config.json and *.safetensors), as `tao run` writes runs/NAME/final")
    _check_config(model, model_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    canonical = {name: first.setdefault(id(p), name) for name, p in params.items()}
    buffers = {name for name, _ in model.named_buffers()}
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    with ExitStack() as files:
        opened = [files.enter_context(_open(f)) for f in _weight_files(model_dir)]
        for st in opened:
            problems += _read_file(st, params, canonical, buffers, out)
        changed = [st.path.name for st in opened if st.changed()]
    if changed:
        raise VersionError(400, f"{model_dir}: {', '.join(changed)} changed while it was read (is the model still "
                           "being written?); reload once it is complete")
    problems += [f"{name}: missing" for name in first.values() if name not in out]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise VersionError(400, f"{model_dir} does not fit the served model ({type(model).__name__}): "
                           f"{'; '.join(problems[:5])}{more}. {FIT_HINT}")
    return out


def _open(f: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(f)
    except Exception as e:  # missing, not a regular file, a bad header
        raise VersionError(400, f"{f}: cannot read the weights ({type(e).__name__}: {e}); write the model again "
                           "(model.save_pretrained)") from None


def _read_file(st: SafetensorsFile, params: dict[str, torch.Tensor], canonical: dict[str, str], buffers: set[str],
               out: dict[str, torch.Tensor]) -> list[str]:
    """Read ``st``'s tensors into ``out`` (one at a time: one tensor beyond ``out`` is ever in memory)."""
    problems = []
    try:
        for key in st.keys():
            name = canonical.get(key)
            if name is None:
                if key not in buffers:
                    problems.append(f"{key}: the served model has no such parameter")
                continue
            if name in out:
                continue
            p = params[name]
            if st.shape(key) != tuple(p.shape):
                problems.append(f"{key}: shape {list(st.shape(key))} in {st.path.name}, the served model's is "
                                f"{list(p.shape)}")
                continue
            t = st.tensor(key)
            if t.dtype != p.dtype and not (t.is_floating_point() and p.is_floating_point()):
                problems.append(f"{key}: dtype {t.dtype} in {st.path.name}, the served model's is {p.dtype}")
                continue
            out[name] = torch.empty_like(p, requires_grad=False).copy_(t)
    except Exception as e:  # a file cut short or corrupt
        raise VersionError(400, f"{st.path}: cannot read the weights ({type(e).__name__}: {e}); write the model "
                           "again (model.save_pretrained)") from None
    return problems


def _weight_files(model_dir: Path) -> list[Path]:
    """The files ``save_pretrained`` wrote: the index's shards, ``model.safetensors``, or every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise VersionError(400, f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return [model_dir / s for s in shards]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (it has {', '.join(bins[:3])}: save it with safetensors, model.save_pretrained)" if bins else ""
        raise VersionError(400, f"{model_dir}: no *.safetensors weights{hint}")
    return files


def _check_config(model: torch.nn.Module, model_dir: Path) -> None:
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise VersionError(400, f"{model_dir}: no config.json; give a model directory in Hugging Face layout")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise VersionError(400, f"{model_dir / 'config.json'}: cannot read it ({type(e).__name__}: {e})") from None
    served = model.config
    differ = [f"{k} {getattr(config, k, None)!r} (served: {getattr(served, k, None)!r})"
              for k in ARCH_FIELDS if getattr(config, k, None) != getattr(served, k, None)]
    if differ:
        raise VersionError(400, f"{model_dir / 'config.json'} does not fit the served model: {'; '.join(differ)}. "
                           f"{FIT_HINT}")
