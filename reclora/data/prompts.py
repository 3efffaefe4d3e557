"""Prompt builder: the paper's templates per dataset, a chat wrapper, and safe truncation.

    text = build_prompt(ds, i, items, ratings, tokenizer=tok, max_tokens=2048)
    target = answer_text(ds.label[i])              # "Yes" or "No"

Templates (RECLORA.md section 4, after the RecLoRA/ReLLa code):

- ML-100K, ML-1M: the user profile, then "He watched the following movies in order in the
  past, and rated them:", one numbered "Title (N stars)" line per history item (oldest
  first), "Based on the movies he has watched, deduce if he will like the movie ***T***.",
  "Note that more stars the user rated the movie, the more the user liked the movie.",
  "You should ONLY tell me yes or no."
- ML-25M: the same without a profile ("The user watched ...").
- GoodReads: books ("The user read the following books ...").

The input is wrapped by the tokenizer's chat template when it has one (as a user turn with
the generation prompt), else by the Vicuna v1.1 wrapper the paper used:
"A chat between ... USER: {input} ASSISTANT:". The answer follows that text.

Variants (``variant=``, for the recipe search of issue 14; "default" is the template above):

- "genres": each history line and the target also show the item's genres, "Title [G1, G2]".
- "summary": after the list, one line counting the shown ratings that are positive under
  the dataset's label rule: "He rated 3 of these 5 movies 4 stars or more (average 3.8
  stars)." (ML-100K, ML-1M, GoodReads: rating >= 4), "... more than 3 stars ..." (ML-25M:
  rating > 3), the base rate of this user under the label the model is trained on.
- "target-first": the target movie is named before the history ("Will he like the movie
  ***T***? He watched ..."), so every history line is read knowing the target.
- "compact": a short template (about 70 fewer tokens with SmolLM2's chat template): no
  profile, "Movies he rated (1-5 stars):" (the dataset's rating range: "(0.5-5 stars)" on
  ML-25M), lines "Title: N stars", "Will he like ***T***? Answer yes or no." Fewer tokens,
  faster steps.
- Flags combine with "+": "genres+summary", "compact+summary", ...

Truncation keeps the question whole: with ``max_tokens`` set, the oldest history lines are
dropped (fewest possible, found by binary search on the exact token count) until the wrapped
prompt fits; if even no history does not fit, it raises instead of cutting the question.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from reclora.data.dataset import HistoryBatch, RecDataset
from reclora.data.text import pronouns

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
ANSWERS = ("No", "Yes")  # indexed by the 0/1 label
VARIANT_FLAGS = ("genres", "summary", "target-first", "compact")


def variant_flags(variant: str) -> frozenset[str]:
    """The flags of a variant name ("default" = none; flags joined by "+")."""
    flags = frozenset() if variant == "default" else frozenset(str(variant).split("+"))
    if not isinstance(variant, str) or not flags <= set(VARIANT_FLAGS):
        raise ValueError(f"variant must be 'default' or flags from {VARIANT_FLAGS} joined "
                         f"by '+', got {variant!r}")
    return flags


def answer_text(label: int) -> str:
    """The target word for a 0/1 label: "No" or "Yes"."""
    if int(label) not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}")
    return ANSWERS[int(label)]


def stars(r: float) -> str:
    """ "4 stars", "1 star", "3.5 stars" (ML-25M has half stars)."""
    return f"{r:g} star" + ("" if r == 1 else "s")


def parse_label_rule(rule: str) -> tuple[str, float]:
    """(operator, threshold) of a dataset's ``label_rule``: "rating >= 4" -> (">=", 4.0)."""
    parts = str(rule).split()
    if len(parts) == 3 and parts[0] == "rating" and parts[1] in (">=", ">"):
        try:
            return parts[1], float(parts[2])
        except ValueError:
            pass
    raise ValueError(f"label rule {rule!r} is not 'rating >= X' or 'rating > X'")


def positive_words(rule: str) -> tuple[Any, str]:
    """(is_positive(rating), its words) under a label rule: ">= 4" is "4 stars or more",
    "> 3" is "more than 3 stars"."""
    op, thr = parse_label_rule(rule)
    if op == ">=":
        return (lambda r: r >= thr), f"{stars(thr)} or more"
    return (lambda r: r > thr), f"more than {stars(thr)}"


# (weak reference to a dataset's ratings, their range): one dataset's at a time, so that a
# batch's prompts scan its ratings once (25M on ML-25M), without keeping them alive.
_RANGE: list[Any] = [None]


def rating_range(dataset: RecDataset) -> tuple[float, float]:
    """(lowest, highest) rating of the dataset's rated interactions, read from its history
    arrays; a serving view, which holds only the histories its requests read, carries the
    served dataset's in ``extra["rating_range"]``."""
    fixed = dataset.extra.get("rating_range")
    if fixed is not None:
        return fixed
    ratings = dataset.hist_rating
    cached = _RANGE[0]
    if cached is None or cached[0]() is not ratings:
        low, high = float(ratings.min()), float(ratings.max())
        cached = _RANGE[0] = (weakref.ref(ratings), (low, high))
    return cached[1]


# What prompts said of the scale before they followed the dataset: MovieLens' words, which
# every run made before then used (prompt_scale; a folder's fingerprints omit it then).
LEGACY_SCALE = "(1-5 stars); 4 stars or more"


def prompt_scale(dataset: RecDataset) -> str:
    """The words compact and summary prompts use for the dataset's rating range and its
    positive label: "(1-5 stars); 4 stars or more" on MovieLens, "(0.5-5 stars); more than 3
    stars" on ML-25M."""
    low, high = rating_range(dataset)
    return f"({low:g}-{high:g} stars); {positive_words(dataset.label_rule)[1]}"


def vicuna_wrap(text: str) -> str:
    return f"{VICUNA_SYSTEM} USER: {text} ASSISTANT:"


@dataclass
class PromptParts:
    """A prompt before wrapping: header, history lines (oldest first), question."""

    header: str
    lines: list[str]
    empty: str  # said instead of the list when no history line is kept
    question: str
    prefix: str = ""  # said before everything ("target-first")
    summary: Any = None  # callable(kept ratings) -> a line after the list ("summary")
    ratings: list[float] | None = None  # per line, for `summary`

    def text(self, keep: int | None = None) -> str:
        start = 0 if keep is None else len(self.lines) - keep
        lines = self.lines[start:]
        if not lines:
            body = self.empty
        else:
            body = self.header + "\n" + "\n".join(f"{j + 1}. {ln}" for j, ln in enumerate(lines))
            if self.summary is not None and self.ratings is not None:
                body += "\n" + self.summary(self.ratings[start:])
        return (self.prefix + "\n" if self.prefix else "") + body + "\n" + self.question


def prompt_parts(dataset: RecDataset, sample: int, history_items: np.ndarray,
                 history_ratings: np.ndarray, with_profile: bool | None = None,
                 variant: str = "default") -> PromptParts:
    """The template for ``dataset.source`` filled for one sample (``variant``: see the module
    docstring; "default" is the paper's template).

    ``history_items``/``history_ratings``: the history to show, oldest first (e.g. the
    retriever's K_text items). ``with_profile``: default True where the dataset has
    profiles (ML-100K, ML-1M) and the template uses them.
    """
    flags = variant_flags(variant)
    items = np.asarray(history_items).reshape(-1)
    ratings = np.asarray(history_ratings).reshape(-1)
    if items.shape != ratings.shape:
        raise ValueError(f"history_items {items.shape} and history_ratings {ratings.shape} "
                         "differ in length")
    sample = int(sample)
    user, target = int(dataset.user[sample]), int(dataset.item[sample])
    kind = dataset.kind
    profile = None
    if with_profile is None:
        with_profile = dataset.source in ("ml-100k", "ml-1m")
    if with_profile and dataset.user_profile is not None:
        profile = dataset.user_profile[user]
    gender = dataset.user_attrs.get("gender", [""] * dataset.n_users)[user] \
        if (profile and dataset.user_attrs) else ""
    subj, _ = pronouns(gender)
    subj_cap = subj[0].upper() + subj[1:]
    verb, verbed, plural = (("watched", "watched", "movies") if kind == "movie"
                            else ("read", "read", "books"))
    header = f"{subj_cap} {verbed} the following {plural} in order in the past, and rated them:"
    empty = f"{subj_cap} has not rated any {plural} before."
    if profile:
        header, empty = profile + "\n" + header, profile + "\n" + empty
    with_genres = "genres" in flags

    def title(i: int) -> str:
        g = dataset.item_genres[i] if with_genres else ""
        return f"{dataset.item_title[i]} [{g}]" if g else dataset.item_title[i]

    question = (f"Based on the {plural} {subj} has {verb}, deduce if {subj} will like the "
                f"{kind} ***{title(target)}***.\n"
                f"Note that more stars the user rated the {kind}, the more the user liked the "
                f"{kind}.\nYou should ONLY tell me yes or no.")
    lines = [f"{title(int(i))} ({stars(float(r))})" for i, r in zip(items, ratings)]
    parts = PromptParts(header, lines, empty, question)
    if "compact" in flags:
        target_title = title(target)
        low, high = rating_range(dataset)
        header = f"{plural.capitalize()} {subj} rated ({low:g}-{high:g} stars):"
        empty = f"{subj_cap} has not rated any {plural} before."
        question = f"Will {subj} like the {kind} ***{target_title}***? Answer yes or no."
        lines = [f"{title(int(i))}: {stars(float(r))}" for i, r in zip(items, ratings)]
        parts = PromptParts(header, lines, empty, question)
    if "target-first" in flags:
        parts.prefix = f"Will {subj} like the {kind} ***{title(target)}***?"
    if "summary" in flags:
        parts.ratings = [float(r) for r in ratings]
        positive, words = positive_words(dataset.label_rule)  # the label the model learns
        parts.summary = lambda rs: (
            f"{subj_cap} rated {sum(positive(r) for r in rs)} of these {len(rs)} {plural} "
            f"{words} (average {np.mean(rs):.1f} stars).")
    return parts


@dataclass
class PromptBuilder:
    """Builds wrapped prompts, truncated to ``max_tokens`` by dropping the oldest lines.

    ``tokenizer``: a transformers tokenizer (needed for ``max_tokens`` and the chat
    template). ``chat_template``: None = use the tokenizer's when it has one, else Vicuna;
    False = always Vicuna. ``system``: an optional system message for chat templates.
    """

    tokenizer: Any = None
    max_tokens: int | None = None
    chat_template: bool | None = None
    with_profile: bool | None = None
    system: str | None = None
    variant: str = "default"

    def __post_init__(self) -> None:
        variant_flags(self.variant)  # raises on an unknown variant
        if self.max_tokens is not None:
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
            if self.tokenizer is None:
                raise ValueError("max_tokens needs a tokenizer to count tokens")

    @property
    def uses_chat_template(self) -> bool:
        if self.chat_template is False or self.tokenizer is None:
            return False
        return bool(getattr(self.tokenizer, "chat_template", None))

    def wrap(self, text: str) -> str:
        """The input wrapped as a user turn, ending where the answer starts."""
        if not self.uses_chat_template:
            return vicuna_wrap(text)
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                  add_generation_prompt=True)

    def n_tokens(self, text: str) -> int:
        # A chat template writes its own special tokens into the text; Vicuna needs BOS.
        ids = self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"]
        return len(ids)

    def bare_tokens(self, dataset: RecDataset, sample: int) -> int:
        """Tokens of `sample`'s prompt with no history line: the least ``max_tokens`` that
        `build` can fit it into (it drops history lines, never the question or profile)."""
        empty = np.zeros(0, dtype=np.int64)
        parts = prompt_parts(dataset, sample, empty, empty, self.with_profile, self.variant)
        return self.n_tokens(self.wrap(parts.text(0)))

    def build(self, dataset: RecDataset, sample: int, history_items: np.ndarray,
              history_ratings: np.ndarray) -> str:
        parts = prompt_parts(dataset, sample, history_items, history_ratings, self.with_profile,
                             self.variant)
        n = len(parts.lines)
        full = self.wrap(parts.text())
        if self.max_tokens is None or self.n_tokens(full) <= self.max_tokens:
            return full
        # Largest number of most-recent lines that fits; token count grows with lines.
        lo, hi = 0, n - 1
        if self.n_tokens(self.wrap(parts.text(0))) > self.max_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is too small for the question "
                             f"and profile of sample {sample} without any history")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.n_tokens(self.wrap(parts.text(mid))) <= self.max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return self.wrap(parts.text(lo))

    def build_batch(self, dataset: RecDataset, samples: np.ndarray,
                    history: HistoryBatch) -> list[str]:
        """Prompts for a batch, from a HistoryBatch (e.g. the retriever's text history)."""
        s = np.asarray(samples).reshape(-1)
        if history.items.shape[0] != s.size:
            raise ValueError(f"history has {history.items.shape[0]} rows for {s.size} samples")
        items, ratings, mask = (history.items.numpy(), history.ratings.numpy(),
                                history.mask.numpy())
        return [self.build(dataset, int(i), items[b][mask[b]], ratings[b][mask[b]])
                for b, i in enumerate(s)]


def build_prompt(dataset: RecDataset, sample: int, history_items: np.ndarray,
                 history_ratings: np.ndarray, tokenizer: Any = None,
                 max_tokens: int | None = None, chat_template: bool | None = None) -> str:
    """One wrapped prompt (see the module docstring); the answer is ``answer_text(label)``."""
    return PromptBuilder(tokenizer, max_tokens, chat_template).build(
        dataset, sample, history_items, history_ratings)
