"""Case files: documents written with maintained writers (python-docx, fpdf2, python-pptx, openpyxl, the email
package) convert to text with the anchors an answer cites (pages, slides, sheets, headings, messages), checked against
what was written; read_file and grep see that text; ingest feeds it, records the converter, skips a corrupt or
encrypted file with its reason, and converts again only what changed."""

import json
import mailbox
from email.message import EmailMessage
from pathlib import Path

import pytest

from deltamem.memory.store import Store
from deltamem.tools import ToolContext, default_tools
from deltamem.tools.base import run_tool
from deltamem.tools.documents import DocumentError, convert
from tests.test_app import deltamem


def _pdf(path: Path, pages: list[str], password: str | None = None) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    if password:
        pdf.set_encryption(owner_password="owner", user_password=password)
    for text in pages:
        pdf.add_page()
        pdf.set_font("helvetica", size=12)
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))


def _mail(subject: str, body: str, html: bool = False, attachment: str | None = None) -> EmailMessage:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "ana@example.org", "ben@example.org", subject
    m["Date"] = "Mon, 02 Mar 2026 10:00:00 +0000"
    m.set_content(body, subtype="html" if html else "plain")
    if attachment:
        m.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename=attachment)
    return m


@pytest.fixture()
def case(tmp_path):
    import docx
    import openpyxl
    from pptx import Presentation

    root = tmp_path / "case"
    root.mkdir()
    _pdf(root / "report.pdf", [f"Finding {i}: the pump failed on day {10 * i}." for i in range(1, 4)])
    d = docx.Document()
    d.add_heading("Lease terms", 1)
    d.add_paragraph("The monthly rent is 900 EUR.")
    d.add_heading("Termination", 2)
    d.add_paragraph("Three months' notice, in writing.")
    d.save(root / "contract.docx")
    p = Presentation()
    for title, text in (("Q3 review", "Revenue up 4%"), ("Q4 plan", "Hire two engineers")):
        s = p.slides.add_slide(p.slide_layouts[1])
        s.shapes.title.text, s.placeholders[1].text = title, text
    p.save(root / "board.pptx")
    wb = openpyxl.Workbook()
    wb.active.title = "Costs"
    wb.active.append(["item", "eur"])
    wb.active.append(["rent", 900])
    wb.create_sheet("Staff").append(["Ana", "lead"])
    wb.save(root / "budget.xlsx")
    (root / "notice.html").write_text("<html><body><h1>Notice</h1><p>Rent due <b>1 May</b>.</p></body></html>")
    (root / "letter.eml").write_bytes(
        _mail("Inspection", "The inspector comes on Friday.", attachment="a.pdf").as_bytes()
    )
    box = mailbox.mbox(root / "thread.mbox")
    box.add(_mail("First", "Please send the invoice."))
    box.add(_mail("Second", "<p>Invoice <b>attached</b>.</p>", html=True))
    box.close()
    return root


def test_documents_convert_with_anchors(case):
    pdf = convert(case / "report.pdf")
    for i in range(1, 4):
        page = pdf.split(f"[page {i}]\n", 1)[1].split("[page", 1)[0]
        assert f"Finding {i}: the pump failed on day {10 * i}." in page
    doc = convert(case / "contract.docx")
    assert "# Lease terms" in doc and "## Termination" in doc
    assert doc.index("900 EUR") < doc.index("## Termination") < doc.index("Three months")
    slides = convert(case / "board.pptx")
    assert slides.index("[slide 1]") < slides.index("Q3 review") < slides.index("[slide 2]") < slides.index("Hire two")
    sheet = convert(case / "budget.xlsx")
    assert sheet.index("## Costs") < sheet.index("| rent | 900 |") < sheet.index("## Staff") < sheet.index("Ana")
    assert "# Notice" in convert(case / "notice.html") and "**1 May**" in convert(case / "notice.html")
    mail = convert(case / "letter.eml")
    assert "Subject: Inspection" in mail and "From: ana@example.org" in mail and "inspector comes on Friday" in mail
    assert "Attachments: a.pdf" in mail
    thread = convert(case / "thread.mbox")
    assert thread.index("[message 1]") < thread.index("Subject: First") < thread.index("[message 2]")
    assert "Invoice **attached**" in thread  # an HTML-only body, converted


FIXTURES = Path(__file__).with_name("fixtures")


@pytest.mark.parametrize("name", ["python-docx", "libreoffice_lease", "word_known_styles", "word_table_style"])
def test_docx_from_several_producers_keeps_text_headings_and_tables(name, case):
    """python-docx (the writer of the case fixture), LibreOffice and Word files, each checked against python-docx's
    own reading of it: every heading a markdown heading of its level, every paragraph's text, every table row a pipe
    row, in document order."""
    import docx

    path = case / "contract.docx" if name == "python-docx" else FIXTURES / f"{name}.docx"
    text = convert(path)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    expected = []  # (line, exact?) in document order
    body = docx.Document(path)
    for p in body.paragraphs:
        words = " ".join(p.text.split())
        if words and p.style.name.startswith("Heading "):
            expected.append(("#" * int(p.style.name.split()[1]) + " " + words, True))
        elif words:
            expected.append((words, False))
    rows = [[" ".join(c.text.split()) for c in r.cells] for t in body.tables for r in t.rows]
    assert expected or rows
    at = 0
    for want, exact in expected:
        at = next(i for i in range(at, len(lines)) if (lines[i] == want if exact else want in lines[i]))
    for row in rows:
        assert "| " + " | ".join(row) + " |" in lines, (row, text)


def test_corrupt_and_encrypted_files_are_refused_with_a_reason(tmp_path):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf" * 10)
    (tmp_path / "broken.docx").write_bytes(b"PK\x03\x04 not a zip")
    _pdf(tmp_path / "locked.pdf", ["secret"], password="pw")
    for name in ("broken.pdf", "broken.docx", "locked.pdf"):
        with pytest.raises(DocumentError):
            convert(tmp_path / name)


def test_read_file_and_grep_see_the_converted_text(case):
    tools, ctx = default_tools(), ToolContext(root=case)
    ok, out = run_tool(ctx, tools, "read_file", {"path": "report.pdf"})
    assert ok and "[page 2]" in out and "day 20" in out
    ok, out = run_tool(ctx, tools, "grep", {"pattern": "day 30"})
    assert ok and out.startswith("report.pdf:") and "Finding 3" in out
    # each match names the page (slide, section) it is on, so that an answer can cite it
    assert out.split(": ", 1)[1].startswith("[page 3] Finding 3"), out
    ok, out = run_tool(ctx, tools, "grep", {"pattern": "notice", "path": "contract.docx"})
    assert ok and out.startswith("contract.docx:") and "[section Termination] Three months' notice" in out, out
    ok, out = run_tool(ctx, tools, "grep", {"pattern": "pump stopped on day 20", "path": "report.pdf"})  # ranked
    assert ok and out.endswith("(best match: report.pdf, page 2: Finding 2: the pump failed on day 20.)"), out
    # search: a question's words, word forms matched (terminated ~ Termination, notices ~ notice), ranked
    ok, out = run_tool(ctx, tools, "search", {"query": "When can the lease be terminated, and with what notices?"})
    assert ok and out.splitlines()[0] == "the lines best matching lease, terminated, notices, best first:"
    assert "contract.docx:" in out and out.endswith("(best match: contract.docx, section Termination: Three months' "
                                                    "notice, in writing.)"), out
    ok, out = run_tool(ctx, tools, "search", {"query": "pump replaced"})
    assert ok and out == "no match for 'pump replaced': any line with two of the words pump, replaced (word forms " \
        "included)"
    assert run_tool(ctx, tools, "search", {"query": "the of ?"}) == (
        False, "error: no words to search for in 'the of ?' (give the words a passage would use)")
    ok, out = run_tool(ctx, tools, "grep", {"pattern": "Ana"})
    assert ok and out.split(": ", 1)[1] == "[sheet Staff] | Ana | lead |", out
    ok, out = run_tool(ctx, tools, "grep", {"pattern": "engineers"})
    assert ok and "board.pptx:" in out and "[slide 2, section Q4 plan] Hire two engineers" in out, out
    # mailboxes too, each hit naming its message; and no tool writes converted text back into a document
    ok, out = run_tool(ctx, tools, "grep", {"pattern": "invoice", "path": "thread.mbox"})
    assert ok and [line.split(": ", 1)[1] for line in out.splitlines()] == [
        "[message 1] Please send the invoice.", "[message 2] Invoice **attached**."], out
    ok, out = run_tool(ctx, tools, "read_file", {"path": "letter.eml"})
    assert ok and "Subject: Inspection" in out and "Content-Type" not in out
    for name in ("letter.eml", "contract.docx"):
        before = (case / name).read_bytes()
        ok, out = run_tool(ctx, tools, "edit", {"path": name, "old": "Inspection" if name == "letter.eml" else
                                                "Lease", "new": "X"})
        assert not ok and "cannot be written back" in out and (case / name).read_bytes() == before


def test_ingest_feeds_documents_and_skips_what_cannot_be_converted(case, tmp_path):
    (case / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    _pdf(case / "locked.pdf", ["secret"], password="pw")
    db = tmp_path / "m.db"
    common = ["--model", "random", "--window", "64", "--repo", str(case), "--db", str(db)]
    r = deltamem("ingest", *common, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    skipped = {s["path"]: s["why"] for s in summary["skipped"]}
    assert set(skipped) == {"broken.pdf", "locked.pdf"} and all("could not convert" in w for w in skipped.values())
    with Store(db) as store:
        ledger = store.ingested("case")
    assert ledger["report.pdf"]["converter"].startswith("markitdown ")
    assert ledger["thread.mbox"]["converter"].startswith("python email ")
    assert {"report.pdf", "contract.docx", "board.pptx", "budget.xlsx", "notice.html", "letter.eml"} <= set(ledger)
    plan = deltamem("ingest", *common, "--dry-run", "--json")
    assert json.loads(plan.stdout)["files"] == []  # nothing changed: nothing converted or fed again
    _pdf(case / "report.pdf", ["Finding 1 revised."])
    plan = json.loads(deltamem("ingest", *common, "--dry-run", "--json").stdout)
    assert [f["path"] for f in plan["files"]] == ["report.pdf"]
