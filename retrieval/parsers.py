"""Files -> (source, title, text) records. Bad input is skipped with one warning line."""
from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

log = logging.getLogger("epic_sglang.ingest")
SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")


@dataclass(frozen=True)
class Record:
    source: str
    title: str
    text: str


def expand(paths: list[str]) -> list[Path]:
    """Files named, found under folders (recursively), or matched by glob patterns."""
    files: list[Path] = []
    for p in paths:
        matches = [Path(m) for m in sorted(glob.glob(p, recursive=True))] or [Path(p)]
        for m in matches:
            if m.is_dir():
                files += sorted(f for f in m.rglob("*") if f.is_file())
            elif m.exists() or m.is_symlink():
                files.append(m)
            else:
                log.warning("skipped %s: no such file or folder", p)
    return files


class _TextOfHTML(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript"):
            self._skip += 1
        self._in_title = tag == "title"
        if tag in ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "tr", "section", "article"):
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript"):
            self._skip = max(0, self._skip - 1)
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data.strip()
        elif not self._skip:
            self.parts.append(data)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise ValueError("binary file")
    return raw.decode("utf-8")


def read_records(path: Path) -> Iterator[Record]:
    """Records of one file; raises for a file that cannot be read (any exception: a PDF
    library raises its own); a JSONL file's bad lines are skipped one by one."""
    ext = path.suffix.lower()
    if ext not in SUPPORTED:
        raise ValueError(f"unsupported extension {ext or '(none)'}; supported: {' '.join(SUPPORTED)}")
    if ext == ".pdf":
        from pypdf import PdfReader

        reader = PdfReader(str(path))
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
        yield Record(str(path), (reader.metadata.title if reader.metadata else None) or path.stem, text)
    elif ext in (".html", ".htm"):
        parser = _TextOfHTML()
        parser.feed(_read_text(path))
        yield Record(str(path), parser.title or path.stem, "".join(parser.parts))
    elif ext == ".jsonl":  # a bad line is skipped alone, with its number
        for i, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("skipped %s line %d: not JSON (%s)", path, i, e)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                log.warning("skipped %s line %d: each line must be a JSON object with a string field 'text'", path, i)
                continue
            yield Record(f"{path}:{i}", str(row.get("title") or row.get("id") or f"{path.stem}:{i}"), row["text"])
    else:
        yield Record(str(path), path.stem, _read_text(path))
