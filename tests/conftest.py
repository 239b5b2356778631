"""Shared fixtures: a tiny random-initialized Llama with a real (small, locally trained) tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.pg_server import postgres_url  # noqa: F401 (the session PostgreSQL server of the table tests)
from tests.table_support import tables, url  # noqa: E402, F401 (fixtures of the inference-table tests)

REPO = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is 12 plus 35? The answer is 47.",
    "Answer: 83. Let me think step by step about the sum of two numbers.",
    "SELECT name, age FROM singer WHERE age > 30 ORDER BY age DESC;",
    "hello world, this is a tiny tokenizer for tests of the tao toolkit.",
    "user assistant system 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } [ ] \" : ,",
]


def make_tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(path: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a tiny random Llama + tokenizer as a Hugging Face directory and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def completion_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0):
    """Reference ``Candidate.logprobs``: one full forward, ``log_softmax(logits / T)`` at the tokens."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _drop_tmp_path_of_a_passed_test(request):
    """A passed test's tmp_path is removed when it ends, a failed one's kept for a look. Runs on the
    embedded model write a checkpoint of ~2 GB each; kept until the session ends (pytest's default) the
    suite held ~4 GB of temporary files at once."""
    yield
    path = request.node.funcargs.get("tmp_path")
    if path is not None and not request.node.stash.get(_FAILED, False):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_lm(tiny_model_dir):
    """A freshly loaded tiny LoadedModel (each test may train it)."""
    from tao_core.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def tao_home(tmp_path, monkeypatch) -> Path:
    """An empty TAO_HOME for tests that write to the model cache."""
    home = tmp_path / "tao-home"
    monkeypatch.setenv("TAO_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models gain nothing from threads, and a shared CPU makes idle OpenMP threads spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
