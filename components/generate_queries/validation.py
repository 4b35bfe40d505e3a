"""What a usable reply is: the output schema, parsing a reply into a pair, and the rules a pair must pass."""

import json
import re
from typing import Any, Optional

from components.common import NEGATIVE, POSITIVE

MIN_QUERY_CHARS = 8
MAX_QUERY_CHARS = 300

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        POSITIVE: {"type": "string", "minLength": MIN_QUERY_CHARS, "maxLength": MAX_QUERY_CHARS},
        NEGATIVE: {"type": "string", "minLength": MIN_QUERY_CHARS, "maxLength": MAX_QUERY_CHARS},
    },
    "required": [POSITIVE, NEGATIVE],
    "additionalProperties": False,
}
# OpenAI's strict structured outputs accept a subset of JSON Schema: no length bounds (validate_pair checks them).
OPENAI_STRICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {POSITIVE: {"type": "string"}, NEGATIVE: {"type": "string"}},
    "required": [POSITIVE, NEGATIVE],
    "additionalProperties": False,
}
JSON_INSTRUCTION = (
    ' Reply with only a JSON object: {"positive": "<a question the anchor answers>", "negative": "<a question'
    ' about the same software that the anchor does not answer>"}.'
)

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


def validate_pair(pair: dict[str, Any], anchor: str, max_chars: int = MAX_QUERY_CHARS) -> Optional[str]:
    """Return why a generated pair is unusable, or None when it is fine."""
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
    return None
