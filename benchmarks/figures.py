"""The generation figures of issue 9 item 0, computed from the fixture after the default filters, and sample rows.

Targets: among kept rows no echo of the prompt's worked examples and no loop, at least 80% real questions or search
phrases, and at least 60% of the generated rows kept.
"""

import re
from typing import Any

from components.common import (
    CHUNK_ID,
    NEGATIVE,
    POSITIVE,
    QUERY_STYLE,
    ROUNDTRIP_RANK,
    SIM_ANCHOR_NEG,
    SIM_ANCHOR_POS,
    training_rows,
    valid_pairs,
)
from components.generate_queries.prompts import styles
from components.generate_queries.validation import copies_example, cut_off, loops, sentence_fragment

ROUNDTRIP_TOP = 10
STYLES = tuple(styles())
TARGETS = {"echoes": ("==", 0.0), "loops": ("==", 0.0), "real_queries": (">=", 0.80), "kept": (">=", 0.60)}
_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def real_query(text: str, style: str) -> bool:
    """Whether a query is what its style asks for: a question ends in "?"; a keyword search has no "?", 2-8
    words and is neither cut off nor a sentence (validation.sentence_fragment); a statement is one sentence (no "?",
    no sentence end before its last character); and none fills its pattern's length limit (validation.cut_off:
    the grammar ended it mid-phrase)."""
    text = text.strip()
    if style in STYLES and cut_off(text, style):
        return False
    if style == "question":
        return text.endswith("?")
    if "?" in text:
        return False
    if style == "keywords":
        return 2 <= len(text.split()) <= 8 and not sentence_fragment(text)
    if style == "statement":
        return len(_SENTENCE_END.findall(text.rstrip(".!"))) == 0
    return False


def share(part: int, whole: int) -> float | None:
    """part / whole, None for an empty whole."""
    return part / whole if whole else None


def generation_figures(frame) -> dict[str, Any]:
    """Counts and shares over every split of mine_negatives' output with the default filters."""
    valid, kept = valid_pairs(frame), training_rows(frame)
    texts = list(zip(kept[POSITIVE], kept[NEGATIVE]))
    echoes = sum(copies_example(positive) or copies_example(negative) for positive, negative in texts)
    looped = sum(loops(positive) or loops(negative) for positive, negative in texts)
    real = sum(real_query(positive, style) for positive, style in zip(kept[POSITIVE], kept[QUERY_STYLE]))
    ranks = valid[ROUNDTRIP_RANK].dropna().astype(int)
    return {
        "rows": len(frame), "valid": len(valid), "kept": len(kept),
        "counts": {"echoes": echoes, "loops": looped, "real_queries": real,
                   "roundtrip_top": int((ranks <= ROUNDTRIP_TOP).sum())},
        "shares": {"echoes": share(echoes, len(kept)), "loops": share(looped, len(kept)),
                   "real_queries": share(real, len(kept)), "kept": share(len(kept), len(frame)),
                   "valid": share(len(valid), len(frame)), "roundtrip_top": share(int((ranks <= ROUNDTRIP_TOP).sum()),
                                                                                  len(ranks)),
                   "positive_beats_negative_valid": beats(valid), "positive_beats_negative_kept": beats(kept)},
        "by_style": {str(style): style_counts(rows, kept[kept[QUERY_STYLE] == style], style)
                     for style, rows in frame.groupby(QUERY_STYLE)},
    }


def style_counts(rows, kept, style: str) -> dict[str, int]:
    """One style's generated rows, kept rows and kept rows that are real queries of the style."""
    return {"rows": int(len(rows)), "kept": int(len(kept)),
            "real": int(sum(real_query(text, style) for text in kept[POSITIVE]))}


def beats(rows) -> float | None:
    """Share of rows whose chunk is closer to the positive than to the LLM's negative (base model)."""
    both = rows[[SIM_ANCHOR_POS, SIM_ANCHOR_NEG]].dropna()
    return share(int((both[SIM_ANCHOR_POS] > both[SIM_ANCHOR_NEG]).sum()), len(both))


def meets(name: str, value: float | None) -> str:
    """"yes"/"no" against the issue's target for a share, "" when it has none."""
    if name not in TARGETS or value is None:
        return ""
    operator, target = TARGETS[name]
    ok = value == target if operator == "==" else value >= target
    return "yes" if ok else "no"


SAMPLE_COLUMNS = ("split", CHUNK_ID, "url", QUERY_STYLE, POSITIVE, NEGATIVE, ROUNDTRIP_RANK)


def sample_rows(frame, count: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """`count` kept rows drawn at random with a fixed seed: what the report shows of each."""
    kept = training_rows(frame)
    rows = kept.sample(n=min(count, len(kept)), random_state=seed)[list(SAMPLE_COLUMNS)]
    return [{**row, ROUNDTRIP_RANK: int(row[ROUNDTRIP_RANK])} for row in rows.to_dict("records")]
