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
# Folders that hold tooling or installed packages, never a project's own documentation.
SKIPPED_DIRS = {"node_modules", "site-packages", "venv", "build", "dist", "local_outputs", "outputs"}


_FRONT_MATTER = re.compile(r"\A(?:---\s*\n.*?\n---|\+\+\+\s*\n.*?\n\+\+\+)\s*(?:\n|\Z)", re.DOTALL)
# Hugo shortcodes: the tags go, the text between paired tags stays.
_SHORTCODE = re.compile(r"\{\{[<%].*?[%>]\}\}", re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HEADING = re.compile(r"^#{1,6}\s+\S")
_FENCE = re.compile(r"^\s*(```|~~~)")


def clean_markdown(text: str) -> str:
    """The page without front matter, Hugo shortcodes and HTML comments."""
    text = _FRONT_MATTER.sub("", text.replace("\r\n", "\n"), count=1)
    text = _HTML_COMMENT.sub("", _SHORTCODE.sub("", text))
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
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        if cut <= max_chars // 2:
            cut = max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        pieces.append(text)
    return pieces


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


def markdown_files(folder: Path) -> list[Path]:
    """The Markdown files below `folder`, sorted, skipping hidden, private and tooling folders."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")) and d not in SKIPPED_DIRS)
        files.extend(Path(root) / name for name in sorted(names) if name.lower().endswith(MARKDOWN_SUFFIXES))
    return files


def markdown_folder_to_splits(
    folder: str | os.PathLike,
    test_fraction: float = 0.2,
    base_url: str = "",
    max_chars: int = MARKDOWN_CHUNK_CHARS,
) -> dict[str, "pandas.DataFrame"]:  # noqa: F821
    """Build the chunk dataset from a folder of Markdown pages.

    The split is by page (no page has chunks in both splits), chosen by a hash of the page path so it
    is stable across runs and machines.
    """
    import pandas as pd

    folder = Path(folder)
    files = [folder] if folder.is_file() else markdown_files(folder)
    root = folder.parent if folder.is_file() else folder
    if not files:
        raise StageError(f"No Markdown files (*.md, *.markdown) found under {folder}.")
    rows = []
    for path in files:
        relative = path.relative_to(root)
        page = relative.as_posix()
        url = _page_url(relative, base_url)
        section = relative.parts[0] if len(relative.parts) > 1 else "root"
        for chunk in chunk_markdown(path.read_text(encoding="utf-8", errors="replace"), max_chars):
            rows.append({"page_content": chunk, "filename": url if base_url else page, "parent_section": section,
                         "url": url, "token_count": len(chunk.split()), "_page": page})
    if not rows:
        raise StageError(f"The Markdown files under {folder} contain no text after cleaning.")
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
    return {"train": frame[~is_test].reset_index(drop=True), "test": frame[is_test].reset_index(drop=True)}
