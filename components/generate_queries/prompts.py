"""The prompt: one query style per request, a worked example, the chunk's page, topic and a bounded excerpt.

Made for small models first (measured on the embedded SmolLM2-135M, see docs/quality.md): a short system prompt,
one worked example from an unrelated product as a user/assistant turn (examples alternate between attempts, so a
copied example is not copied twice), the chunk's page and heading as its topic, and an excerpt of bounded length.
Strong LLMs get the same prompt with the whole chunk (`prompt_excerpt_chars` = 0). The templates and the styles live
beside this module in `templates/`.
"""

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from components.common import ANCHOR, NEGATIVE, POSITIVE

TEMPLATES = Path(__file__).parent / "templates"
STYLE_COLUMN = "query_style"
VARIANT_COLUMN = "query_variant"  # which of a chunk's queries of one style this row is (0, 1, ...)
MIN_QUERY_CHARS = 8
MAX_QUERY_CHARS = 300
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")


@lru_cache(maxsize=1)
def styles() -> dict[str, dict[str, Any]]:
    """Query styles by name: what the positive and negative are, the pattern a reply must match, worked examples."""
    return json.loads((TEMPLATES / "styles.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=4)
def _template(name: str):
    from jinja2 import Environment, StrictUndefined

    environment = Environment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
    return environment.from_string((TEMPLATES / name).read_text(encoding="utf-8"))


def parse_styles(text: str) -> tuple[str, ...]:
    """`question,keywords` -> ("question", "keywords"); unknown names are an error that lists the known ones."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in styles()]
    if not names or unknown:
        raise ValueError(f"query styles {text!r}: use a comma-separated list of {', '.join(styles())}.")
    return names


def page_title(url: Any, filename: Any = "") -> str:
    """The last three path segments of the page, readable: `pipelines > user guides > run a pipeline`."""
    path = urlparse(url).path if isinstance(url, str) and url else str(filename or "")
    parts = [part for part in re.split(r"[/\\]", path) if part and part not in ("docs", "index.md")]
    parts = [re.sub(r"\.(md|markdown|html?)$", "", part) for part in parts]
    return " > ".join(part.replace("-", " ").replace("_", " ") for part in parts[-3:])


def topic(row: dict[str, Any]) -> str:
    """What the chunk is about: its first Markdown heading, else the page's last path segment."""
    match = _HEADING.search(str(row.get(ANCHOR) or ""))
    if match:
        return _LINK.sub(r"\1", match.group(1)).strip("*_` ")
    return page_title(row.get("url"), row.get("filename")).split(" > ")[-1]


def excerpt(text: str, max_chars: int) -> str:
    """The chunk with whitespace collapsed, cut at a word boundary after `max_chars` (0: the whole chunk)."""
    text = " ".join(str(text).split())
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0] + " ..."


def _user_message(page: str, topic_text: str, excerpt_text: str) -> dict[str, str]:
    return {"role": "user", "content": _template("user.jinja2").render(page=page, topic=topic_text,
                                                                       excerpt=excerpt_text)}


def build_messages(row: dict[str, Any], context: str, style: str, example: int, excerpt_chars: int) -> list[dict]:
    """The chat messages for one query of `style` about the row's chunk, with worked example number `example`."""
    definition = styles()[style]
    shown = definition["examples"][example % len(definition["examples"])]
    system = _template("system.jinja2").render(context=context, style=definition)
    reply = json.dumps({POSITIVE: shown[POSITIVE], NEGATIVE: shown[NEGATIVE]})
    return [
        {"role": "system", "content": system},
        _user_message(shown["page"], shown["topic"], shown["excerpt"]),
        {"role": "assistant", "content": reply},
        _user_message(page_title(row.get("url"), row.get("filename")), topic(row),
                      excerpt(row.get(ANCHOR) or "", excerpt_chars)),
    ]


def grammar_pattern(pattern: str) -> str:
    """A style's pattern as the grammar must see it: no negated class admits a quote or a backslash.

    llama.cpp applies a string's pattern to the raw characters between the JSON quotes, so `[^?\\n]` let the model
    write `...", "negative": "...` inside one string: a reply the grammar accepted and no JSON parser could read
    (measured: 19 of the 45 failed rows of `make run` on this project's docs). Validation keeps the plain pattern,
    so a quoted word in an API model's query still passes.
    """
    return pattern.replace("[^", '[^"\\\\')


def output_schema(style: str) -> dict[str, Any]:
    """The JSON schema of a reply in `style`; llama.cpp turns its patterns into a grammar the reply must follow."""
    query = {"type": "string", "minLength": MIN_QUERY_CHARS, "maxLength": MAX_QUERY_CHARS,
             "pattern": grammar_pattern(styles()[style]["pattern"])}
    return {"type": "object", "properties": {POSITIVE: query, NEGATIVE: query},
            "required": [POSITIVE, NEGATIVE], "additionalProperties": False}


def example_replies() -> list[str]:
    """Every worked example's queries: a reply that repeats one of them has copied the prompt."""
    return [example[key] for definition in styles().values() for example in definition["examples"]
            for key in (POSITIVE, NEGATIVE)]


def query_rows(chunks: list[dict[str, Any]], style_names: tuple[str, ...], per_chunk: int) -> list[dict[str, Any]]:
    """Each chunk `per_chunk` times, styles taken in turn; a style's second query of a chunk gets variant 1, ..."""
    return [{**chunk, STYLE_COLUMN: style_names[number % len(style_names)],
             VARIANT_COLUMN: number // len(style_names)}
            for chunk in chunks for number in range(per_chunk)]
