"""Prompts from label names: templates and diversifiers combined under a seed, as GPT-FL does.

For every label, :func:`build_prompts` fills templates such as ``"a {style} of a {label},
{context}"`` with diversifier words (context, style, viewpoint, domain) drawn from a random
generator seeded by ``(seed, label)``: the same seed gives the same prompts, a label's prompts
do not depend on which other labels are requested, and duplicates are never returned.

A user-supplied prompt file for a label (one prompt per line, ``#`` comments) replaces the
generated prompts of that label. Optionally, as the paper does with T5 fine-tuned on
CommonGen, a local text-to-text model (:class:`Seq2SeqExpander`) turns label names into
sentences; template prompts top up when it yields too few distinct ones.
"""

from __future__ import annotations

import logging
import random
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from gptfl.errors import ConfigError

logger = logging.getLogger(__name__)

#: templates; each may use ``{label}`` (required) and any of the diversifier slots
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a {style} of a {label}",
    "a {style} of a {label}, {context}",
    "a {viewpoint} {style} of a {label}",
    "a {viewpoint} {style} of a {label}, {context}",
    "a {label} {context}, {domain}",
    "a {style} of a {label}, {domain}",
    "a {viewpoint} shot of a {label} {context}",
    "{label}, {style}, {domain}",
)

#: diversifier words per slot name (the paper's context, style, viewpoint and domain words)
DEFAULT_DIVERSIFIERS: Mapping[str, tuple[str, ...]] = {
    "style": (
        "photo",
        "close-up photo",
        "drawing",
        "sketch",
        "painting",
        "watercolor painting",
        "3d render",
        "black and white photo",
        "high-resolution photo",
        "low-resolution photo",
    ),
    "context": (
        "in the wild",
        "on a table",
        "in a city street",
        "indoors",
        "outdoors",
        "in the snow",
        "at night",
        "in bright sunlight",
        "on a plain background",
        "in a cluttered scene",
        "next to a person",
        "in a field",
    ),
    "viewpoint": ("front view", "side view", "top-down", "low-angle", "wide-angle", "zoomed-in"),
    "domain": (
        "realistic",
        "studio lighting",
        "natural lighting",
        "vintage film",
        "cartoon style",
        "blurry",
    ),
}

# Beyond this many rejection-sampling attempts per wanted prompt, the remaining space is
# enumerated instead, so small template sets still terminate deterministically.
_ATTEMPTS_PER_PROMPT = 20


class PromptExpander(Protocol):
    """Something that turns a label name into candidate sentences (e.g. a text-to-text model)."""

    def expand(self, label: str, *, count: int, seed: int) -> list[str]:
        """Up to ``count`` candidate prompts for ``label``, deterministic for ``seed``."""
        ...


def build_prompts(
    labels: Sequence[str],
    *,
    per_label: int,
    seed: int,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    diversifiers: Mapping[str, Sequence[str]] = DEFAULT_DIVERSIFIERS,
    overrides: Mapping[str, Sequence[str]] | None = None,
    expander: PromptExpander | None = None,
) -> dict[str, list[str]]:
    """Distinct prompts for every label.

    Args:
        labels: the label names, in label order; must be distinct and non-empty.
        per_label: prompts wanted per label (a label with an override gets at most this many
            of its file's prompts, fewer when the file holds fewer).
        seed: seed of the draws; the same seed gives the same prompts.
        templates: prompt templates with a ``{label}`` slot and optional diversifier slots.
        diversifiers: words per slot name.
        overrides: label -> prompts that replace the generated ones (see
            :func:`load_prompt_files`).
        expander: an optional text-to-text model whose sentences come first; template
            prompts fill up what it does not provide.

    Returns:
        label -> list of distinct prompts, in ``labels`` order.

    Raises:
        ConfigError: bad labels, counts, templates, or fewer distinct prompts are possible
            than requested.
    """
    _check_labels(labels)
    if per_label < 1:
        raise ConfigError(f"prompts per label must be >= 1, got {per_label}")
    _check_templates(templates, diversifiers)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(labels))
    if unknown:
        raise ConfigError(f"prompt overrides for unknown label(s): {', '.join(unknown)}")
    result: dict[str, list[str]] = {}
    for label in labels:
        if label in overrides:
            prompts = _dedupe(overrides[label])
            if not prompts:
                raise ConfigError(f"the prompt override for label {label!r} holds no prompts")
            result[label] = prompts[:per_label]
            continue
        prompts = []
        if expander is not None:
            sentences = expander.expand(label, count=per_label, seed=seed)
            prompts = _dedupe(_mention_label(s, label) for s in sentences)[:per_label]
        result[label] = _fill_from_templates(
            label,
            prompts,
            per_label=per_label,
            seed=seed,
            templates=templates,
            diversifiers=diversifiers,
        )
    return result


def load_prompt_file(path: Path) -> list[str]:
    """Reads a prompt file: one prompt per line; blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: the file cannot be read, or holds no prompt.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    prompts = _dedupe(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def load_prompt_files(files: Mapping[str, Path]) -> dict[str, list[str]]:
    """label -> prompts read from each label's prompt file (see :func:`load_prompt_file`)."""
    return {label: load_prompt_file(Path(path)) for label, path in files.items()}


def template_space_size(templates: Sequence[str], diversifiers: Mapping[str, Sequence[str]]) -> int:
    """How many distinct (template, fillers) combinations exist for one label."""
    total = 0
    for template in templates:
        count = 1
        for slot in _slots(template):
            if slot != "label":
                count *= len(set(diversifiers[slot]))
        total += count
    return total


class Seq2SeqExpander:
    """A local text-to-text model (e.g. T5 fine-tuned on CommonGen) that writes sentences.

    The model and tokenizer are loaded from a directory with ``local_files_only=True``; no
    download ever happens. The input for a label is ``input_template`` filled with the label
    and one context word, so different draws ask for different scenes.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        input_template: str = "{label} {context}",
        context_words: Sequence[str] = DEFAULT_DIVERSIFIERS["context"],
        max_new_tokens: int = 32,
        top_p: float = 0.9,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._input_template = input_template
        self._context_words = tuple(context_words)
        self._max_new_tokens = max_new_tokens
        self._top_p = top_p

    @classmethod
    def from_directory(cls, path: Path, **options: Any) -> Seq2SeqExpander:
        """Loads ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` from ``path`` (CPU, eval).

        Raises:
            ConfigError: the directory is missing or does not hold a loadable model.
        """
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if not Path(path).is_dir():
            raise ConfigError(f"prompt expander directory {path} does not exist")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a text-to-text model from {path}: {exc}") from None
        model.eval()
        return cls(model, tokenizer, **options)

    def expand(self, label: str, *, count: int, seed: int) -> list[str]:
        """Samples ``count`` sentences for ``label`` (nucleus sampling, seeded by ``seed``)."""
        import torch

        rng = random.Random(f"{seed}:{label}:expander")
        inputs = [
            self._input_template.format(label=label, context=rng.choice(self._context_words))
            for _ in range(count)
        ]
        encoded = self._tokenizer(inputs, return_tensors="pt", padding=True)
        # A private generator state: the caller's global RNG is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            with torch.no_grad():
                output = self._model.generate(
                    input_ids=encoded["input_ids"],
                    attention_mask=encoded["attention_mask"],
                    do_sample=True,
                    top_p=self._top_p,
                    max_new_tokens=self._max_new_tokens,
                )
        texts = self._tokenizer.batch_decode(output, skip_special_tokens=True)
        return [" ".join(str(text).split()) for text in texts if str(text).strip()]


def _fill_from_templates(
    label: str,
    prompts: list[str],
    *,
    per_label: int,
    seed: int,
    templates: Sequence[str],
    diversifiers: Mapping[str, Sequence[str]],
) -> list[str]:
    """Tops ``prompts`` up to ``per_label`` distinct prompts drawn from the templates."""
    seen = {p.lower() for p in prompts}
    missing = per_label - len(prompts)
    if missing <= 0:
        return prompts
    space = template_space_size(templates, diversifiers)
    if per_label > space + len(prompts):
        raise ConfigError(
            f"label {label!r}: {per_label} prompts requested but the templates allow only "
            f"{space} distinct ones; add templates or diversifiers, or lower the count"
        )
    # Seeded by (seed, label) so a label's prompts do not depend on the other labels.
    rng = random.Random(f"{seed}:{label}")
    pools = {slot: sorted(set(words)) for slot, words in diversifiers.items()}
    attempts = 0
    while len(prompts) < per_label and attempts < _ATTEMPTS_PER_PROMPT * per_label:
        attempts += 1
        template = rng.choice(list(templates))
        fillers = {slot: rng.choice(pools[slot]) for slot in _slots(template) if slot != "label"}
        prompt = _normalise(template.format(label=label, **fillers))
        if prompt.lower() not in seen:
            seen.add(prompt.lower())
            prompts.append(prompt)
    if len(prompts) < per_label:
        # Nearly exhausted space: enumerate the rest in a seeded order.
        rest = [p for p in _enumerate_all(label, templates, pools) if p.lower() not in seen]
        rng.shuffle(rest)
        prompts.extend(rest[: per_label - len(prompts)])
    if len(prompts) < per_label:
        raise ConfigError(
            f"label {label!r}: only {len(prompts)} distinct prompts are possible, "
            f"{per_label} requested"
        )
    return prompts


def _enumerate_all(
    label: str, templates: Sequence[str], pools: Mapping[str, Sequence[str]]
) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for template in templates:
        partials: list[dict[str, str]] = [{}]
        for slot in _slots(template):
            if slot == "label":
                continue
            partials = [{**p, slot: word} for p in partials for word in pools[slot]]
        for fillers in partials:
            prompt = _normalise(template.format(label=label, **fillers))
            if prompt.lower() not in seen:
                seen.add(prompt.lower())
                out.append(prompt)
    return out


def _slots(template: str) -> list[str]:
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return names


def _check_labels(labels: Sequence[str]) -> None:
    if not labels:
        raise ConfigError("at least one label is required")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"label names must be non-empty strings, got {label!r}")
    duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
    if duplicates:
        raise ConfigError(f"duplicate label name(s): {', '.join(duplicates)}")


def _check_templates(templates: Sequence[str], diversifiers: Mapping[str, Sequence[str]]) -> None:
    if not templates:
        raise ConfigError("at least one prompt template is required")
    for template in templates:
        try:
            slots = _slots(template)
        except ValueError as exc:
            raise ConfigError(f"malformed prompt template {template!r}: {exc}") from None
        if "label" not in slots:
            raise ConfigError(f"prompt template {template!r} has no {{label}} slot")
        for slot in slots:
            if slot != "label" and not diversifiers.get(slot):
                raise ConfigError(
                    f"prompt template {template!r} uses slot {{{slot}}} with no diversifier words"
                )


def _mention_label(sentence: str, label: str) -> str:
    # A sentence that never names the class would make an off-label image.
    if label.lower() in sentence.lower():
        return sentence
    return f"a photo of a {label}, {sentence}"


def _normalise(prompt: str) -> str:
    return " ".join(prompt.split())


def _dedupe(prompts: Any) -> list[str]:
    """Distinct prompts (whitespace-normalised, compared case-insensitively), first kept."""
    seen: set[str] = set()
    out: list[str] = []
    for prompt in prompts:
        text = _normalise(str(prompt))
        key = text.lower()
        if text and key not in seen:
            seen.add(key)
            out.append(text)
    return out
