"""Turning packaged documents into plain prose: HTML pages, reStructuredText sources, dictd
dictionaries and long plain-text manuals, for the general corpus (:mod:`.corpus`).

Every function is pure and deterministic (text in, text out), so the same package always
gives the same corpus. Code is dropped where it is set apart from the prose (HTML ``<pre>``,
reST literal and doctest blocks, code directives): the corpus is for English, and inline
identifiers stay as they are read in a sentence.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path

# --------------------------------------------------------------------------- plain text


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, runs of blank lines cut to one, no tabs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ").replace("\u00a0", " ")
    lines = [line.rstrip() for line in text.split("\n")]
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return out.strip("\n")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each with its lines joined by single spaces."""
    return [" ".join(line.strip() for line in block.split("\n") if line.strip())
            for block in re.split(r"\n\s*\n", normalize(text)) if block.strip()]


def group_paragraphs(paras: Iterable[str], target_chars: int = 6000, min_words: int = 4) -> list[str]:
    """Join paragraphs into documents of about ``target_chars`` characters (never splitting one).

    Paragraphs of fewer than ``min_words`` words (headings, lines of a table of contents,
    stray list items) are dropped: they are not sentences.
    """
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for p in paras:
        if len(p.split()) < min_words:
            continue
        current.append(p)
        size += len(p) + 2
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- HTML

_BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
          "section", "article", "blockquote", "tr", "hr", "header", "footer", "title", "caption"}
_SKIP_TAGS = {"script", "style", "pre", "head", "nav", "table", "svg", "form", "button", "noscript", "map"}
_SKIP_CLASSES = {"navheader", "navfooter", "toc", "sphinxsidebar", "related", "footer", "header",
                 "breadcrumbs", "menu", "nav", "headerlink", "copyright", "legalnotice", "codeblock",
                 "highlight", "literal-block", "programlisting", "screen", "synopsis"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "wbr", "source"}


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # open elements: tag, does it start a skipped region
        self.skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set()
        for name, value in attrs:
            if name in ("class", "id") and value:
                classes.update(value.lower().split())
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
        if tag in _BLOCK and not self.skip_depth:
            self.parts.append("\n\n")
        if tag in _VOID:
            return
        self.stack.append((tag, skip))
        if skip:
            self.skip_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK and not self.skip_depth:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or all(t != tag for t, _ in self.stack):
            return
        while self.stack:  # elements left open inside (<p>, <li> without end tags) close here too
            open_tag, skip = self.stack.pop()
            if skip:
                self.skip_depth -= 1
            if open_tag == tag:
                break
        if tag in _BLOCK and not self.skip_depth:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The prose of an HTML page: block elements become paragraphs; scripts, styles, code
    listings (``<pre>``), tables, navigation and page furniture are dropped."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    paras = [re.sub(r" +", " ", p).strip() for p in "".join(parser.parts).split("\n\n")]
    return "\n\n".join(p for p in paras if p)


# --------------------------------------------------------------------------- reStructuredText

# directives whose body is code, data or machinery, not prose
_CODE_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "testsetup", "testcleanup",
    "literalinclude", "productionlist", "toctree", "highlight", "index", "image", "figure", "raw", "include",
    "csv-table", "list-table", "table", "autosummary", "tabularcolumns", "sectionauthor", "moduleauthor",
    "module", "currentmodule", "program", "option", "envvar", "cmdoption", "opcode", "audit-event",
    "c:macro", "c:var", "c:type", "c:member", "only", "graphviz", "math", "parsed-literal", "line-block",
}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s.*)?$")
_UNDERLINE = re.compile(r"^\s*([=\-~^*#+`'\":._])\1{2,}\s*$")
_ROLE = re.compile(r":([\w:.-]+):`([^`]*)`")
_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _inline(text: str) -> str:
    def role(m: re.Match[str]) -> str:
        name, inner = m.group(1), m.group(2)
        t = _TARGET.match(inner)
        inner = t.group(1) if t and t.group(1) else inner
        if inner.startswith("~"):  # Sphinx shows the last component only
            inner = inner[1:].rsplit(".", 1)[-1]
        inner = inner.lstrip("!")
        return f"{name.upper()} {inner}" if name in ("rfc", "pep") else inner

    text = _ROLE.sub(role, text)
    text = re.sub(r"`([^`<]+?)\s*<[^`>]*>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\s?\[#?[\w-]*\]_", "", text)  # footnote references
    text = re.sub(r"(?<![_\w])([A-Za-z][A-Za-z0-9-]*)__?(?=[\s.,;:)]|$)", r"\1", text)  # link_ references
    return text.replace("\\ ", "").replace("\\", "")


def rst_to_text(rst: str) -> str:
    """The prose of a reStructuredText source: section underlines, comments, code and
    machinery directives, literal (``::``) and doctest (``>>>``) blocks are dropped; prose
    directives (notes, function descriptions...) keep their body; inline markup is unwrapped."""
    lines = normalize(rst).split("\n")
    out: list[str] = []
    i, n = 0, len(lines)

    def skip_block(start: int, base: int) -> int:
        """Index of the first line after the block indented deeper than ``base`` from ``start``."""
        j = start
        while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        return j

    literal_next, literal_base = False, 0
    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            out.append("")
            i += 1
            continue
        if literal_next and _indent(line) > literal_base:
            i = skip_block(i, literal_base)
            literal_next = False
            continue
        literal_next = False
        m = _DIRECTIVE.match(line)
        if m:
            base = len(m.group(1))
            name = m.group(2).lower()
            name = name.split(":", 1)[1] if name.startswith(("py:", "std:", "rst:")) else name
            if name in _CODE_DIRECTIVES or (name.startswith("c:") and name != "c:function"):
                i = skip_block(i + 1, base)
                continue
            i += 1
            while i < n and lines[i - 1].endswith("\\"):  # a signature continued on the next line
                i += 1
            while i < n and re.match(r"^\s+:[\w-]+:(\s.*)?$", lines[i]):  # directive options
                i += 1
            continue  # the body stays, as ordinary lines
        if _COMMENT.match(line):  # comments, link targets, substitution definitions
            i = skip_block(i + 1, _indent(line))
            continue
        if _UNDERLINE.match(line):
            i += 1
            continue
        if stripped.startswith(">>>"):
            while i < n and lines[i].strip():
                i += 1
            continue
        if re.match(r"^\s*[+|][-=+|]*$", stripped) or stripped.startswith("+-") or stripped.startswith("+="):
            i += 1
            continue
        text = line
        if stripped.endswith("::"):
            literal_next, literal_base = True, _indent(line)
            text = line.rstrip()[:-2].rstrip()
            text = text + ":" if text and not text.endswith((":", " ")) else text
            if not text.strip():
                i += 1
                continue
        out.append(text.strip())
        i += 1
    return normalize(_inline("\n".join(out)))


# --------------------------------------------------------------------------- dictd


def read_dictd(index_path: Path, dict_path: Path) -> Iterator[tuple[str, str]]:
    """(headword, definition) of a dictd database, in index order, without the
    ``00-database-*`` entries that describe the database itself.

    A ``.dict.dz`` file is gzip-compatible; offsets and lengths in the index are base64
    numbers (dictd's alphabet, the standard one) into the uncompressed text.
    """
    raw = gzip.open(dict_path).read() if dict_path.suffix == ".dz" else dict_path.read_bytes()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        v = 0
        for ch in s:
            v = v * 64 + alphabet.index(ch)
        return v

    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00"):
            continue
        start, length = b64(fields[1]), b64(fields[2])
        yield fields[0], raw[start:start + length].decode("utf-8", errors="replace")


def dictd_entry_text(headword: str, definition: str) -> str:
    """One entry as prose: the definition's lines rejoined into paragraphs (its first line,
    the bare headword, dropped; cross-reference braces unwrapped)."""
    lines = definition.split("\n")
    if lines and lines[0].strip().lower() == headword.strip().lower():
        lines = lines[1:]
    body = re.sub(r"\{([^{}]*)\}", r"\1", "\n".join(lines))
    return "\n\n".join(paragraphs(body))
