"""Markdown pages to chunks: cleaning, splitting at headings with a bounded size, and the page-level split.

Part of the load_docs stage.
"""

import hashlib
import math
import os
import re
from pathlib import Path

from components.common import StageError, chunk_id

MARKDOWN_CHUNK_CHARS = 2000
MARKDOWN_OVERLAP_CHARS = 50
# Sections shorter than this (a lone heading, say) are merged into the section that follows.
MIN_SECTION_CHARS = 100
MARKDOWN_SUFFIXES = (".md", ".markdown")
# A bigger Markdown file is no documentation page (a log, an export, embedded data): skipped and counted.
MAX_FILE_BYTES = 10_000_000
# Why a file was not read; stats.json counts the files per reason.
SKIP_OUTSIDE = "link_outside_folder"
SKIP_TOO_LARGE = "too_large"
SKIP_NOT_UTF8 = "not_utf8"
SKIP_UNREADABLE = "unreadable"
# Folders that hold tooling or installed packages, never a project's own documentation.
SKIPPED_DIRS = {"node_modules", "site-packages", "venv", "build", "dist", "local_outputs", "outputs"}


# Only blanks may follow the delimiter lines: `\s*` there could also take newlines, and trying every split of a long
# run of newlines before failing made an unclosed front matter quadratic.
_FRONT_MATTER = re.compile(r"\A(?:---[ \t]*\n.*?\n---|\+\+\+[ \t]*\n.*?\n\+\+\+)[ \t]*(?:\n|\Z)", re.DOTALL)
# Hugo shortcodes (the tags go, the text between paired tags stays) and HTML comments, as (opening, closing).
# They are removed by `_strip_delimited`, not by a lazy regex: `<!--.*?-->` scans to the end of the text from
# every unclosed opening, which made 120 KB of `<!--` take 25 s.
_SHORTCODE = (re.compile(r"\{\{[<%]"), re.compile(r"[%>]\}\}"))
_HTML_COMMENT = (re.compile(r"<!--"), re.compile(r"-->"))
_HEADING = re.compile(r"^#{1,6}\s+\S")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _strip_delimited(text: str, opening: re.Pattern, closing: re.Pattern) -> str:
    """Text without each span from an opening to the first closing after it, in one pass (linear in the text).

    An opening with no closing after it stays, as do all later ones: none of them can be closed either.
    """
    kept, position = [], 0
    while (start := opening.search(text, position)) is not None:
        end = closing.search(text, start.end())
        if end is None:
            break
        kept.append(text[position : start.start()])
        position = end.end()
    kept.append(text[position:])
    return "".join(kept)


def clean_markdown(text: str) -> str:
    """The page without front matter, Hugo shortcodes and HTML comments."""
    text = _FRONT_MATTER.sub("", text.replace("\r\n", "\n"), count=1)
    text = _strip_delimited(_strip_delimited(text, *_SHORTCODE), *_HTML_COMMENT)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_sections(text: str) -> list[str]:
    """Split Markdown at headings, ignoring `#` lines inside fenced code blocks."""
    sections: list[list[str]] = [[]]
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence and _HEADING.match(line) and any(part.strip() for part in sections[-1]):
            sections.append([])
        sections[-1].append(line)
    return [joined for joined in ("\n".join(lines).strip() for lines in sections) if joined]


def _hard_split(text: str, max_chars: int) -> list[str]:
    """Split one over-long paragraph at whitespace so no piece exceeds max_chars."""
    # Positions into the text, not a shrinking copy of its rest: copying the rest per piece was quadratic.
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind(" ", start, start + max_chars)
        if cut <= start + max_chars // 2:
            cut = start + max_chars
        pieces.append(text[start:cut].strip())
        start = cut
        while start < len(text) and text[start].isspace():
            start += 1
    if text[start:]:
        pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def _tail(text: str, overlap: int) -> str:
    """The last `overlap` characters of text, starting at a word boundary."""
    if overlap <= 0 or len(text) <= overlap:
        return ""
    tail = text[-overlap:]
    space = tail.find(" ")
    return tail[space + 1 :] if 0 <= space < len(tail) - 1 else tail


def split_text(text: str, max_chars: int, overlap: int = MARKDOWN_OVERLAP_CHARS) -> list[str]:
    """Pack paragraphs into pieces of at most max_chars; consecutive pieces share `overlap` chars."""
    if len(text) <= max_chars:
        return [text]
    overlap = min(overlap, max_chars // 4)
    budget = max_chars - overlap - 1  # room for the overlap prefix carried into the next piece
    paragraphs: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraphs.extend(_hard_split(paragraph.strip(), budget) if len(paragraph) > budget else [paragraph.strip()])
    pieces: list[str] = []
    current = ""
    for paragraph in filter(None, paragraphs):
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if len(candidate) <= budget or not current:
            current = candidate
            continue
        pieces.append(current)
        prefix = _tail(current, overlap)
        current = f"{prefix} {paragraph}".strip() if prefix else paragraph
    if current:
        pieces.append(current)
    return pieces


def chunk_markdown(text: str, max_chars: int = MARKDOWN_CHUNK_CHARS,
                   overlap: int = MARKDOWN_OVERLAP_CHARS) -> list[str]:
    """Chunk a Markdown page by headings into pieces of at most max_chars with a small overlap."""
    chunks: list[str] = []
    pending = ""  # a heading-only or very short section is carried into the next one
    for section in split_sections(clean_markdown(text)):
        section = f"{pending}\n\n{section}" if pending else section
        pending = ""
        if len(section) < MIN_SECTION_CHARS:
            pending = section
            continue
        chunks.extend(split_text(section, max_chars, overlap))
    if pending:
        if chunks and len(chunks[-1]) + len(pending) + 2 <= max_chars:
            chunks[-1] = f"{chunks[-1]}\n\n{pending}"
        else:
            chunks.append(pending)
    return [chunk for chunk in chunks if chunk.strip()]


def _page_url(relative: Path, base_url: str) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts and parts[-1] in ("_index", "index", "README"):
        parts = parts[:-1]
    path = "/".join(parts)
    if not base_url:
        return relative.as_posix()
    return base_url.rstrip("/") + "/" + (path + "/" if path else "")


def scan_markdown(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the Markdown files below `folder`, sorted; the links below it that lead out of it, not followed).

    Hidden, private and tooling folders are skipped. A link to a folder is never descended (os.walk's default);
    a link to a file is listed when its target is inside `folder`.
    """
    inside = folder.resolve()
    files, outside = [], []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")) and d not in SKIPPED_DIRS)
        links = [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
        candidates = links + [Path(root) / name for name in sorted(names) if name.lower().endswith(MARKDOWN_SUFFIXES)]
        for path in candidates:
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                outside.append(path)
            elif path not in links:
                files.append(path)
    return files, outside


def markdown_files(folder: Path) -> list[Path]:
    """The Markdown files below `folder` that `scan_markdown` reads."""
    return scan_markdown(folder)[0]


def read_page(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[str | None, str]:
    """(the page's text, "") or (None, why it is skipped): too large, not UTF-8, or unreadable.

    Strict decoding: a page in another encoding would otherwise become replacement characters, billed as text.
    """
    try:
        if path.stat().st_size > max_bytes:
            return None, SKIP_TOO_LARGE
        return path.read_bytes().decode("utf-8-sig"), ""
    except UnicodeDecodeError:
        return None, SKIP_NOT_UTF8
    except OSError:  # a dangling link, no permission
        return None, SKIP_UNREADABLE


def describe_skipped(skipped: dict[str, list[str]]) -> str:
    """`2 not_utf8 (a.md, b.md), 1 too_large (big.md)`: the skipped files, for logs and errors."""
    return "; ".join(f"{len(names)} {reason} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                     for reason, names in sorted(skipped.items()))


def _page_rows(folder: Path, base_url: str, max_chars: int, max_file_bytes: int) -> tuple[list[dict], dict]:
    """One row per chunk of each readable page below `folder` (or of the file `folder`), and the skipped files."""
    if folder.is_file():  # a file named explicitly is read even when it is a link
        files, outside, root = [folder], [], folder.parent
    else:
        (files, outside), root = scan_markdown(folder), folder
    if not files and not outside:
        raise StageError(f"No Markdown files (*.md, *.markdown) found under {folder}.")
    skipped: dict[str, list[str]] = {}
    for link in outside:
        skipped.setdefault(SKIP_OUTSIDE, []).append(link.relative_to(root).as_posix())
    rows = []
    for path in files:
        relative = path.relative_to(root)
        page = relative.as_posix()
        text, reason = read_page(path, max_file_bytes)
        if text is None:
            skipped.setdefault(reason, []).append(page)
            continue
        url = _page_url(relative, base_url)
        section = relative.parts[0] if len(relative.parts) > 1 else "root"
        for chunk in chunk_markdown(text, max_chars):
            rows.append({"page_content": chunk, "filename": url if base_url else page, "parent_section": section,
                         "url": url, "token_count": len(chunk.split()), "_page": page})
    return rows, skipped


def markdown_folder_to_splits(
    folder: str | os.PathLike,
    test_fraction: float = 0.2,
    base_url: str = "",
    max_chars: int = MARKDOWN_CHUNK_CHARS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> tuple[dict[str, "pandas.DataFrame"], dict[str, list[str]]]:  # noqa: F821
    """Build the chunk dataset from a folder of Markdown pages: ({split: chunks}, {reason: skipped files}).

    The split is by page (no page has chunks in both splits), chosen by a hash of the page path so it
    is stable across runs and machines. Links leading out of the folder, files over `max_file_bytes`, files
    that are not UTF-8 and unreadable files are skipped and returned by reason.
    """
    import pandas as pd

    folder = Path(folder)
    rows, skipped = _page_rows(folder, base_url, max_chars, max_file_bytes)
    if not rows:
        raise StageError(f"The Markdown files under {folder} contain no text after cleaning."
                         + (f" Skipped: {describe_skipped(skipped)}." if skipped else ""))
    frame = pd.DataFrame(rows)
    pages = sorted(frame["_page"].unique(), key=lambda page: hashlib.sha256(page.encode()).hexdigest())
    if len(pages) >= 2:
        n_test = min(len(pages) - 1, max(1, math.ceil(test_fraction * len(pages))))
        is_test = frame["_page"].isin(set(pages[:n_test]))
    else:  # one page: split its chunks instead, by a hash of the chunk
        digests = frame["page_content"].map(lambda text: int(chunk_id(text), 16) % 1000)
        is_test = digests < test_fraction * 1000
        if len(frame) >= 2 and (is_test.all() or not is_test.any()):
            is_test = pd.Series([i == len(frame) - 1 for i in range(len(frame))], index=frame.index)
    frame = frame.drop(columns="_page")
    return {"train": frame[~is_test].reset_index(drop=True), "test": frame[is_test].reset_index(drop=True)}, skipped
