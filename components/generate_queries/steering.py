"""Keeps an in-process model off the worked examples' words: a logit bias per request.

The embedded 135M model copies the prompt's worked example when a chunk is hard for it ("How do I back up all tables
with db dump?" about a page on benchmarks). Validation rejects the copy and asks again, and the model copies the next
example. Measured on the 45 rows of `make run` (this project's docs) that failed all three attempts: 54 of 135 replies
copied an example. With the examples' own topic words banned wherever the row's prompt does not use them, 43 of the
45 rows got a valid pair (32 without the ban); the model then asks about words it was given.

Only for llama.cpp in-process (`llm=local` or `llamacpp:`): an API's token ids are its own, and strong models do not
copy examples.
"""

import re
from functools import lru_cache
from typing import Callable

from components.generate_queries.prompts import example_replies

# Effectively a ban: llama.cpp adds this to the token's logit before sampling.
EXAMPLE_WORD_BIAS = -100.0
# Words a query of any topic uses (first words of the styles, function words, "I need", "every"): never banned.
_QUERY_WORDS = frozenset(
    "what how why when which where who can does are should the and for all any with from into about this that your"
    " you need want every before next user like".split()
)
# Two words with the same first five letters count as one (table, tables; render, rendering).
_STEM = 5


@lru_cache(maxsize=1)
def example_words() -> tuple[str, ...]:
    """The topic words of the worked examples' replies (3+ letters, lowercase): what a copied example is made of.
    Computed once: every request's bias and cache key ask for it."""
    return tuple(sorted({word.lower() for reply in example_replies() for word in re.findall(r"[A-Za-z]+", reply)
                   if len(word) >= 3 and word.lower() not in _QUERY_WORDS}))


def banned_words(prompt: str) -> list[str]:
    """The example words the row's prompt (page, topic, excerpt) does not use: its reply may not use them either."""
    stems = {word[:_STEM] for word in re.findall(r"[a-z0-9]+", prompt.lower())}
    return [word for word in example_words() if word[:_STEM] not in stems]


def bias_rule() -> dict[str, object]:
    """What decides a prompt's bias besides the prompt itself, for the row cache key: a changed word list or
    strength makes new entries."""
    return {"bias": EXAMPLE_WORD_BIAS, "words": example_words(), "stem": _STEM}


class ExampleWordBias:
    """`logit_bias` for a prompt: every single-token spelling of each banned word (word, Word, WORD, with and
    without a leading space) gets EXAMPLE_WORD_BIAS. `tokenize` is llama.cpp's (bytes -> token ids)."""

    def __init__(self, tokenize: Callable[..., list[int]]):
        self._tokenize = tokenize
        self._tokens: dict[str, set[int]] = {}

    def _single_tokens(self, word: str) -> set[int]:
        if word not in self._tokens:
            spellings = {form for base in {word, word.capitalize(), word.upper()} for form in (base, f" {base}")}
            ids = (self._tokenize(spelling.encode("utf-8"), add_bos=False, special=False) for spelling in spellings)
            self._tokens[word] = {tokens[0] for tokens in ids if len(tokens) == 1}
        return self._tokens[word]

    def __call__(self, prompt: str) -> dict[str, float]:
        """The bias for a request whose last user message is `prompt` (llama-cpp-python takes string ids)."""
        return {str(token): EXAMPLE_WORD_BIAS for word in banned_words(prompt)
                for token in sorted(self._single_tokens(word))}
