"""Prompts from label names: seeded, deduplicated, counted, overridable, optionally expanded."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl.errors import ConfigError
from synth_service.prompts import (
    DEFAULT_DIVERSIFIERS,
    DEFAULT_TEMPLATES,
    Seq2SeqExpander,
    build_prompts,
    load_prompt_file,
    load_prompt_files,
    template_space_size,
)

LABELS = ["airplane", "cat", "ship"]


def test_same_seed_gives_same_prompts_and_another_seed_different_ones() -> None:
    first = build_prompts(LABELS, per_label=12, seed=7)
    again = build_prompts(LABELS, per_label=12, seed=7)
    other = build_prompts(LABELS, per_label=12, seed=8)
    assert first == again
    assert first != other
    assert all(first[label] != other[label] for label in LABELS)


@settings(max_examples=25, deadline=None)
@given(per_label=st.integers(1, 60), seed=st.integers(0, 2**32))
def test_count_per_label_and_no_duplicates(per_label: int, seed: int) -> None:
    prompts = build_prompts(LABELS, per_label=per_label, seed=seed)
    assert list(prompts) == LABELS
    for label, texts in prompts.items():
        assert len(texts) == per_label
        assert len({t.lower() for t in texts}) == per_label
        assert all(label in t for t in texts)
        assert all(t == " ".join(t.split()) for t in texts)


def test_a_labels_prompts_do_not_depend_on_the_other_labels() -> None:
    alone = build_prompts(["cat"], per_label=10, seed=3)
    together = build_prompts(["dog", "cat", "horse"], per_label=10, seed=3)
    assert alone["cat"] == together["cat"]


def test_prompts_use_diversifier_words() -> None:
    prompts = build_prompts(["cat"], per_label=30, seed=0)["cat"]
    styles = DEFAULT_DIVERSIFIERS["style"]
    contexts = DEFAULT_DIVERSIFIERS["context"]
    assert len({s for s in styles for p in prompts if s in p}) >= 3
    assert len({c for c in contexts for p in prompts if c in p}) >= 3


def test_a_small_template_space_is_used_exactly_and_overflow_is_an_error() -> None:
    templates = ["a {style} of a {label}"]
    words = {"style": ["photo", "sketch", "painting"]}
    assert template_space_size(templates, words) == 3
    prompts = build_prompts(["cat"], per_label=3, seed=1, templates=templates, diversifiers=words)
    assert sorted(prompts["cat"]) == [
        "a painting of a cat",
        "a photo of a cat",
        "a sketch of a cat",
    ]
    with pytest.raises(ConfigError, match="allow only 3 distinct"):
        build_prompts(["cat"], per_label=4, seed=1, templates=templates, diversifiers=words)


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        ([], {}, "at least one label"),
        (["cat", "cat"], {}, "duplicate label"),
        (["cat", " "], {}, "non-empty"),
        (["cat"], {"per_label": 0}, ">= 1"),
        (["cat"], {"templates": ["a photo"]}, "no {label} slot"),
        (["cat"], {"templates": ["a {mood} {label}"]}, "slot {mood}"),
        (["cat"], {"overrides": {"dog": ["a dog"]}}, "unknown label"),
        (["cat"], {"overrides": {"cat": ["  "]}}, "holds no prompts"),
    ],
)
def test_bad_settings_are_config_errors(
    labels: list[str], kwargs: dict[str, object], message: str
) -> None:
    options: dict[str, object] = {"per_label": 4, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        build_prompts(labels, **options)  # type: ignore[arg-type]


def test_override_file_replaces_the_generated_prompts_of_its_label(tmp_path: Path) -> None:
    file = tmp_path / "cat.txt"
    file.write_text(
        "# prompts for cats\n"
        "a tabby cat asleep on a sofa\n"
        "\n"
        "a  tabby cat asleep on a sofa\n"  # duplicate after whitespace normalisation
        "A TABBY CAT ASLEEP ON A SOFA\n"  # duplicate ignoring case
        "a black cat on a fence\n"
        "a kitten in the grass\n",
        encoding="utf-8",
    )
    assert load_prompt_file(file) == [
        "a tabby cat asleep on a sofa",
        "a black cat on a fence",
        "a kitten in the grass",
    ]
    prompts = build_prompts(
        ["cat", "ship"], per_label=2, seed=0, overrides=load_prompt_files({"cat": file})
    )
    assert prompts["cat"] == ["a tabby cat asleep on a sofa", "a black cat on a fence"]
    assert prompts["ship"] == build_prompts(["ship"], per_label=2, seed=0)["ship"]
    # Fewer prompts in the file than requested: the file's prompts, no invented ones.
    more = build_prompts(["cat"], per_label=10, seed=0, overrides={"cat": load_prompt_file(file)})
    assert len(more["cat"]) == 3


def test_unreadable_or_empty_prompt_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read prompt file"):
        load_prompt_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompt_file(empty)


def test_text_to_text_expander_is_seeded_and_mentions_the_label(tiny_t5_dir: Path) -> None:
    expander = Seq2SeqExpander.from_directory(tiny_t5_dir, max_new_tokens=12)
    first = build_prompts(["cat", "dog"], per_label=6, seed=1, expander=expander)
    again = build_prompts(["cat", "dog"], per_label=6, seed=1, expander=expander)
    other = build_prompts(["cat", "dog"], per_label=6, seed=2, expander=expander)
    assert first == again
    assert first != other
    template_only = build_prompts(["cat", "dog"], per_label=6, seed=1)
    assert first != template_only
    for label, texts in first.items():
        assert len(texts) == 6
        assert len({t.lower() for t in texts}) == 6
        assert all(label in t.lower() for t in texts)


def test_expander_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Seq2SeqExpander.from_directory(tmp_path / "nope")
    with pytest.raises(ConfigError, match="cannot load"):
        Seq2SeqExpander.from_directory(tmp_path)


def test_default_templates_all_name_the_label() -> None:
    assert all("{label}" in t for t in DEFAULT_TEMPLATES)
    assert template_space_size(DEFAULT_TEMPLATES, DEFAULT_DIVERSIFIERS) > 1_000
