"""Case files as text: PDF, PPTX, XLSX and HTML through markitdown (Microsoft's maintained converter), DOCX through
mammoth (what markitdown itself uses for DOCX, called directly: markitdown 0.1.9's DOCX path fails on files
python-docx writes) into HTML and then markdown, e-mail (.eml, .mbox) through the standard library's email package,
with anchors an answer can cite:

- PDF: a `[page N]` line before each page (pdfminer's page breaks in markitdown's output);
- PPTX: `[slide N]` before each slide; DOCX, HTML: their headings as markdown headings; XLSX: a `## Sheet` heading
  per sheet;
- e-mail: `[message N]` before each message of a mailbox, then its From/To/Date/Subject lines and its text body
  (an HTML-only body converted), attachments named.

Ingest feeds the converted text (and records CONVERTER in its ledger); read_file and grep read documents and e-mail
(PDF, DOCX, PPTX, XLSX, .eml, .mbox) converted too (a mailbox's raw form splits lines at soft breaks and names no
message), while HTML is read as it is on disk (its source is what an agent edits in a code project); edit refuses
them all but HTML. A file that cannot be converted (corrupt, encrypted, not what its
extension says) raises DocumentError with the reason.
"""

from __future__ import annotations

import email
import email.policy
import functools
import importlib.metadata
import io
import mailbox
import re
import sys
from pathlib import Path

CONVERTED = {".pdf", ".docx", ".pptx", ".xlsx", ".html", ".htm", ".eml", ".mbox"}  # by ingest
# read as their converted text by read_file and grep too (each line's page, slide, section or message known); HTML
# stays as it is on disk, the source an agent edits in a code project
READ_CONVERTED = {".pdf", ".docx", ".pptx", ".xlsx", ".eml", ".mbox"}
MAX_DOCUMENT_BYTES = 50_000_000


class DocumentError(ValueError):
    """A document that could not be converted; the message says why."""


def converter_for(path: str | Path) -> str:
    """What converts this document, with its version (recorded in the ingest ledger)."""
    ext = Path(path).suffix.lower()
    if ext in (".eml", ".mbox"):
        return f"python email {sys.version_info.major}.{sys.version_info.minor}"
    names = ["mammoth", "markitdown"] if ext == ".docx" else ["markitdown"]  # DOCX: mammoth, then markitdown's HTML
    return " + ".join(f"{name} {_version(name)}" for name in names)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def is_document(path: str | Path) -> bool:
    return Path(path).suffix.lower() in CONVERTED


def convert(path: Path) -> str:
    """The text of a document with its anchors (cached by path, size and modification time)."""
    st = path.stat()
    if st.st_size > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"larger than {MAX_DOCUMENT_BYTES:,} bytes")
    return _convert(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _convert(path: str, size: int, mtime_ns: int) -> str:
    ext = Path(path).suffix.lower()
    try:
        if ext == ".eml":
            with open(path, "rb") as f:
                return _message_text(email.message_from_binary_file(f, policy=email.policy.default))
        if ext == ".mbox":
            box = mailbox.mbox(path, factory=lambda f: email.message_from_binary_file(f, policy=email.policy.default),
                               create=False)
            return "\n\n".join(f"[message {i}]\n{_message_text(m)}" for i, m in enumerate(box, 1))
        with open(path, "rb") as f:
            text = _docx_convert(f) if ext == ".docx" else _markitdown_convert(f, ext)
    except DocumentError:
        raise
    except Exception as e:  # the converters raise whatever their parsers do on a damaged or encrypted file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DocumentError(f"could not convert ({type(e).__name__}: {reason[:200]})") from None
    if ext == ".pdf":
        pages = text.split("\f")
        if pages and not pages[-1].strip():
            pages.pop()
        if not any(p.strip() for p in pages):
            raise DocumentError("no text in this PDF (scanned images need OCR, which deltamem does not run)")
        text = "\n\n".join(f"[page {i}]\n{p.strip()}" for i, p in enumerate(pages, 1))
    elif ext == ".pptx":
        text = re.sub(r"<!-- Slide number: (\d+) -->", r"[slide \1]", text)
    return text.strip() + "\n"


def _markitdown_convert(stream, ext: str) -> str:
    """markitdown's converter for this format alone: its MarkItDown front end falls back to reading a file it cannot
    convert as plain text, which would feed a damaged PDF's raw bytes."""
    try:
        from markitdown import StreamInfo, converters
    except ImportError as e:
        raise DocumentError("markitdown is not installed (pip install 'markitdown[pdf,pptx,xlsx]')") from e
    cls = {".pdf": converters.PdfConverter, ".pptx": converters.PptxConverter, ".xlsx": converters.XlsxConverter,
           ".html": converters.HtmlConverter, ".htm": converters.HtmlConverter}[ext]
    return cls().convert(stream, StreamInfo(extension=ext)).text_content or ""


def _docx_convert(stream) -> str:
    """DOCX -> HTML (mammoth: headings, lists, tables; Word's, LibreOffice's and python-docx's files alike) -> markdown
    (markitdown's HTML converter: headings as `#` lines, tables as pipe tables)."""
    try:
        import mammoth
    except ImportError as e:
        raise DocumentError("mammoth is not installed (pip install mammoth)") from e
    html = mammoth.convert_to_html(stream).value
    return _markitdown_convert(io.BytesIO(html.encode()), ".html") if html.strip() else ""


def _message_text(msg) -> str:
    lines = [f"{h}: {msg[h]}" for h in ("From", "To", "Cc", "Date", "Subject") if msg[h]]
    body = msg.get_body(preferencelist=("plain", "html"))
    text = ""
    if body is not None:
        text = body.get_content()
        if body.get_content_type() == "text/html":
            text = _markitdown_convert(io.BytesIO(text.encode()), ".html")
    names = [part.get_filename() for part in msg.iter_attachments() if part.get_filename()]
    if names:
        lines.append("Attachments: " + ", ".join(names))
    return "\n".join(lines) + "\n\n" + text.strip()
