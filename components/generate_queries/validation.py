"""What a usable reply is: the output schema, parsing a reply into a pair, and the rules a pair must pass."""

import json
import re
from functools import lru_cache
from typing import Any, Optional

from components.common import ANCHOR, NEGATIVE, POSITIVE
from components.generate_queries.prompts import (
    MAX_QUERY_CHARS,
    MIN_QUERY_CHARS,
    example_replies,
    output_schema,
    page_title,
    styles,
)

# The default style's schema; each request carries the schema of its own style (prompts.output_schema).
OUTPUT_SCHEMA: dict[str, Any] = output_schema("question")
# OpenAI's strict structured outputs accept a subset of JSON Schema: no length bounds or patterns (validate_pair
# checks them).
OPENAI_STRICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {POSITIVE: {"type": "string"}, NEGATIVE: {"type": "string"}},
    "required": [POSITIVE, NEGATIVE],
    "additionalProperties": False,
}
# Words too common in queries to show what a query is about.
_STOPWORDS = frozenset(
    "about after also does from have into like more should that their them then there these they this those"
    " what when where which while will with would your using used".split()
)
# A reply whose word 3-grams are less varied than this repeats itself ("The user is impressed. The user is ...").
MIN_DISTINCT_TRIGRAMS = 0.7
# A reply sharing this much of its vocabulary with a worked example copied it.
MAX_EXAMPLE_OVERLAP = 0.6
_PLACEHOLDER = re.compile(r"<\s*(a|an|the)\s+(question|query|keyword|sentence)|\{\{|\}\}", re.IGNORECASE)

# A keyword search that ends on one of these was cut off mid-phrase; one of 4+ words with one of the verbs after its
# first word is a sentence, unless it starts like a question ("what is kubeflow pipelines" is a common search). The
# embedded model wrote "jupyterlab-native is a new way to" as a search.
_DANGLING_WORDS = frozenset("a an and as at by for from in into of on or than that the to with your".split())
_SENTENCE_VERBS = frozenset("is are was were has have can will".split())
_QUESTION_WORDS = frozenset("what how why when where which who".split())

# A pattern's bounded repeat this long limits characters, not words: a query that fills it was cut off there by the
# grammar (measured on the Kubeflow test split: 37 of 95 kept statements and 10 of 97 questions ended mid-phrase at
# 110, "... the [link](https://forms.gle/...) in.").
MIN_CHARACTER_RUN = 50
_BOUNDED_REPEAT = re.compile(r"\{(\d+),(\d+)\}")

_SECTIONS = re.compile(r"##\s*Positive\s*:?\s*(.*?)\s*##\s*Negative\s*:?\s*(.*?)\s*$", re.DOTALL | re.IGNORECASE)
_FENCED = re.compile(r"^```(?:json)?\s*|\s*```$")
_WORD = re.compile(r"[a-z]{4,}")


def parse_generation(text: Optional[str]) -> tuple[Optional[dict[str, str]], Optional[str]]:
    """Extract {positive, negative} from an LLM reply: JSON first, then `## Positive/## Negative` sections."""
    if text is None or not text.strip():
        return None, "empty reply"
    stripped = _FENCED.sub("", text.strip())
    start, end = stripped.find("{"), stripped.rfind("}")
    if start != -1 and end > start:
        try:
            payload = json.loads(stripped[start : end + 1])
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            return {key: payload.get(key) for key in (POSITIVE, NEGATIVE)}, None
    match = _SECTIONS.search(text)
    if match:
        return {POSITIVE: match.group(1), NEGATIVE: match.group(2)}, None
    return None, "reply is neither JSON nor '## Positive/## Negative' sections"


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def restates_instructions(value: str, anchor: str, instructions: str) -> bool:
    """True when most words of a reply come from the prompt's instructions rather than the document.

    Small models often answer "The anchor is a chunk of documentation..." instead of asking a question.
    """
    words = _WORD.findall(value.lower())
    if not words:
        return False
    instruction_words = set(_WORD.findall(instructions.lower())) - set(_WORD.findall(anchor.lower()))
    return sum(word in instruction_words for word in words) / len(words) > 0.5


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def loops(value: str) -> bool:
    """True when a reply repeats the same few words over and over."""
    words = _words(value)
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(trigrams) >= 6 and len(set(trigrams)) / len(trigrams) < MIN_DISTINCT_TRIGRAMS


def copies_example(value: str) -> bool:
    """True when a reply is (nearly) one of the prompt's worked examples."""
    words = set(_words(value))
    for example in example_replies():
        shown = set(_words(example))
        if words and len(words & shown) / len(words | shown) >= MAX_EXAMPLE_OVERLAP:
            return True
    return False


def grounded(value: str, anchor: str, page: str = "") -> bool:
    """True when the query shares a content word (4+ letters, not a stop word) with its chunk or page."""
    content = {word for word in _words(value) if len(word) >= 4} - _STOPWORDS
    return bool(content & set(_words(f"{anchor} {page}")))


def sentence_fragment(value: str) -> bool:
    """True when a keyword search is a cut-off phrase or a sentence rather than search terms."""
    words = [word.strip("._/-") for word in value.lower().split()]
    if not words:
        return False
    sentence = len(words) >= 4 and words[0] not in _QUESTION_WORDS and bool(_SENTENCE_VERBS & set(words[1:]))
    return words[-1] in _DANGLING_WORDS or sentence


@lru_cache(maxsize=None)
def _one_shorter(pattern: str) -> Optional[str]:
    """`pattern` with its longest character run (a bounded repeat of MIN_CHARACTER_RUN or more) one shorter; None
    when it has none."""
    runs = [match for match in _BOUNDED_REPEAT.finditer(pattern) if int(match[2]) >= MIN_CHARACTER_RUN]
    if not runs:
        return None
    run = max(runs, key=lambda match: int(match[2]))
    return f"{pattern[:run.start()]}{{{run[1]},{int(run[2]) - 1}}}{pattern[run.end():]}"


def cut_off(value: str, style: str) -> bool:
    """True when a query of the style's pattern fills its character run to the bound: the grammar ended it there."""
    pattern = styles()[style]["pattern"]
    shorter = _one_shorter(pattern)
    text = value.strip()
    return shorter is not None and bool(re.fullmatch(pattern, text)) and not re.fullmatch(shorter, text)


def style_problem(value: str, style: str) -> Optional[str]:
    """Why a query is not of its style (a question ends in '?', a keyword search has none and is no sentence; none
    is cut off at the pattern's length limit), or None."""
    pattern = styles()[style]["pattern"]
    if re.fullmatch(pattern, value.strip()):
        if cut_off(value, style):
            return f"not a {style} query (cut off at the length limit)"
        return "not a keywords query (a sentence or cut off)" if style == "keywords" and sentence_fragment(value) \
            else None
    if style == "question" and value.strip().endswith("?"):
        return None  # a real question that starts differently ("In a pipeline, how ...?") is still a question
    return f"not a {style} query"


def validate_pair(pair: dict[str, Any], anchor: str, max_chars: int = MAX_QUERY_CHARS, style: Optional[str] = None,
                  page: str = "") -> Optional[str]:
    """Return why a generated pair is unusable, or None when it is fine.

    With a `style`, also: each query is of that style, repeats no words in a loop, copies no worked example and no
    placeholder of the prompt, and the positive shares a content word with its chunk or page.
    """
    for key in (POSITIVE, NEGATIVE):
        value = pair.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"{key} missing"
        if len(value.strip()) < MIN_QUERY_CHARS:
            return f"{key} too short ({len(value.strip())} chars)"
        if len(value) > max_chars:
            return f"{key} too long ({len(value)} chars > {max_chars})"
        if _normalised(value) == _normalised(anchor):
            return f"{key} copies the anchor"
    if _normalised(pair[POSITIVE]) == _normalised(pair[NEGATIVE]):
        return "positive and negative are the same"
    return _style_checks(pair, anchor, style, page) if style else None


def _style_checks(pair: dict[str, Any], anchor: str, style: str, page: str) -> Optional[str]:
    for key in (POSITIVE, NEGATIVE):
        value = pair[key]
        problem = style_problem(value, style)
        if problem:
            return f"{key}: {problem}"
        if loops(value):
            return f"{key} loops"
        if copies_example(value) or _PLACEHOLDER.search(value):
            return f"{key} copies the prompt"
    if not grounded(pair[POSITIVE], anchor, page):
        return "positive shares no word with its chunk"
    return None


def row_problem(pair: dict[str, Any], row: dict[str, Any], style: str) -> Optional[str]:
    """validate_pair for a generate_queries row: its chunk, the query style and its page's title."""
    return validate_pair(pair, row[ANCHOR], style=style, page=page_title(row.get("url"), row.get("filename")))
