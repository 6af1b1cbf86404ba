"""scripts/agent_tasks.py's case-file folders: documents (PDF, DOCX, XLSX, PPTX, mailbox, e-mail) written with facts
in them, one "which document and where" question per fact. Training folders and the evaluation's draw their facts
from disjoint templates (THEMES)."""

from __future__ import annotations

import random
from pathlib import Path

from agent_tasks_core import Task, consistent

# Fact templates ("the ATTRIBUTE for ENTITY is VALUE"). Training folders and the evaluation's use disjoint ones.
THEMES = {
    "train": [
        ("monthly rent", "unit {c}{n}", "{m},{k}00 EUR"),
        ("deposit", "unit {c}{n}", "{m},{k}50 EUR"),
        ("notice period", "tenant file T-{nn}", "{n} months"),
        ("inspection date", "site {w}-{n}", "{d} {mon} 2026"),
        ("service charge", "building {w}", "{k}{n} EUR a quarter"),
        ("parking fee", "bay {nn}", "{k}{n} EUR a month"),
        ("contract number", "supplier {w}", "K-{nnn}"),
        ("delivery window", "store {w}", "{n} to {m} days"),
        ("start date", "employee {w} {c}.", "{d} {mon} 2027"),
        ("annual budget", "department {w}", "{m}{k}0,000 EUR"),
    ],
    "eval": [
        ("deductible", "claim C-{nnn}", "{m}{k}0 EUR"),
        ("warranty period", "product line {w}", "{n} years"),
        ("unit price", "order PO-{nnn}", "{m}.{k}{n} EUR"),
        ("penalty rate", "project {w}", "{n}.{k}% a week"),
        ("approval date", "permit P-{nn}", "{d} {mon} 2026"),
        ("insured value", "vessel {w}", "{m}.{n} million EUR"),
        ("response deadline", "tender {w}-{n}", "{d} {mon} 2027"),
    ],
}
WORDS = (
    "Alder Birch Cedar Delta Ember Fjord Granite Harbor Iris Juniper Kestrel Larch Meadow Nimbus Onyx Pebble "
    "Quarry Raven Summit Tundra Umber Vale Willow Yarrow Zephyr".split()
)
MONTHS = "January February March April May June July August September October November December".split()
FILLER = [
    "The parties met to review the open items listed in the schedule.",
    "All amounts are stated without value added tax unless noted otherwise.",
    "This section summarises the correspondence received during the period.",
    "Copies of the signed pages are kept in the archive of the office.",
    "Questions about this document go to the administration desk.",
    "The figures below were checked against the ledger at the end of the month.",
    "Any change to these terms must be agreed in writing by both sides.",
    "The committee noted the report and asked for an update next quarter.",
]
DOC_Q = [
    "Which document states the {attr} for {entity}, and on which page?",
    "Where in the case files is the {attr} for {entity} given? Cite the file and page.",
    "Which file and page give the {attr} for {entity}?",
]
DOCX_Q = [
    "Which document states the {attr} for {entity}, and in which section?",
    "Where in the case files is the {attr} for {entity} given? Cite the file and section.",
]
# by format: the questions (what an answer must cite beside the file: case_folder's `cite`)
FORMAT_Q = {
    "pdf": DOC_Q,
    "docx": DOCX_Q,
    "xlsx": ["Which workbook and sheet give the {attr} for {entity}?",
             "Where in the case files is the {attr} for {entity} given? Cite the file and sheet."],
    "pptx": ["Which presentation states the {attr} for {entity}, and on which slide?",
             "Where in the case files is the {attr} for {entity} given? Cite the file and slide."],
    "mbox": ["Which mailbox and message give the {attr} for {entity}?",
             "Where in the case files is the {attr} for {entity} given? Cite the file and message."],
    "eml": ["Which e-mail states the {attr} for {entity}?",
            "Which file in the case folder gives the {attr} for {entity}?"],
}  # fmt: skip


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        c=rng.choice("ABCDEFGH"),
        n=rng.randint(2, 9),
        m=rng.randint(1, 9),
        k=rng.randint(1, 9),
        nn=rng.randint(10, 99),
        nnn=rng.randint(1000, 9999),
        w=rng.choice(WORDS),
        d=rng.randint(1, 28),
        mon=rng.choice(MONTHS),
    )


def case_folder(root: Path, rng: random.Random, split: str, n_docs: int = 6, facts_per_doc: int = 4,
                formats: tuple[str, ...] = ("pdf", "docx")) -> list[Task]:  # fmt: skip
    """Write a folder of documents with facts in them, one question per fact. Formats, in turn: PDF (a page per
    part, fpdf2), DOCX (a heading per part, python-docx), XLSX (a sheet per part, openpyxl), PPTX (a slide per part,
    python-pptx), mailbox (a message per part, the email package) and e-mail (one message)."""
    root.mkdir(parents=True, exist_ok=True)
    themes = THEMES[split]
    tasks, seen = [], set()
    for i in range(n_docs):
        facts = []
        while len(facts) < facts_per_doc:
            attr, ent, val = rng.choice(themes)
            entity, value = _fill(ent, rng), _fill(val, rng)
            if (attr, entity) not in seen:
                seen.add((attr, entity))
                facts.append((attr, entity, value))
        kind = rng.choice(["report", "memo", "schedule", "minutes", "review", "letter"])
        stem = f"{kind}_{rng.choice(WORDS).lower()}_{i + 1}"
        fmt = formats[i % len(formats)]
        name = f"{stem}.{fmt}"
        sections = [[rng.choice(FILLER) for _ in range(rng.randint(2, 4))] for _ in range(rng.randint(3, 5))]
        headings = [
            f"{rng.choice(['Terms', 'Schedule', 'Findings', 'Costs', 'Notes', 'Dates'])} {j + 1}"
            for j in range(len(sections))
        ]
        if fmt == "eml":  # one message: one part
            sections, headings = [sum(sections, [])], [f"{stem.replace('_', ' ').title()}"]
        placed = []
        for attr, entity, value in facts:
            j = rng.randrange(len(sections))
            sentence = f"The {attr} for {entity} is {value}."
            sections[j].insert(rng.randint(0, len(sections[j])), sentence)
            placed.append((attr, entity, sentence, j))
        _write_document(root / name, fmt, stem, headings, sections)
        for attr, entity, sentence, j in placed:
            anchor = {"pdf": f"page {j + 1}", "docx": f"section {headings[j]}", "xlsx": f"sheet {headings[j]}",
                      "pptx": f"slide {j + 1}", "mbox": f"message {j + 1}", "eml": ""}[fmt]  # fmt: skip
            q = rng.choice(FORMAT_Q[fmt]).format(attr=attr, entity=entity)
            cite = {"pdf": [f"page {j + 1}", f"p. {j + 1}", f"p.{j + 1}"], "docx": [headings[j]], "xlsx": [headings[j]],
                    "pptx": [f"slide {j + 1}"], "mbox": [f"message {j + 1}", headings[j]]}.get(fmt)  # fmt: skip
            expect = [[name], cite] if cite else [[name]]
            facts = {"path": name, "anchor": anchor, "sentence": sentence}
            tasks.append(Task("document", q, [("grep", {"pattern": f"{attr} for {entity}"})], expect, facts))
    return [t for t in tasks if consistent(root, t)]


def _write_document(path: Path, fmt: str, title: str, headings: list[str], parts: list[list[str]]) -> None:
    if fmt == "pdf":
        from fpdf import FPDF

        doc = FPDF()
        for lines in parts:
            doc.add_page()
            doc.set_font("helvetica", size=11)
            for line in lines:
                doc.multi_cell(0, 7, line, new_x="LMARGIN", new_y="NEXT")
        doc.output(str(path))
    elif fmt == "docx":
        import docx

        d = docx.Document()
        d.add_heading(title.replace("_", " ").title(), 1)
        for h, lines in zip(headings, parts, strict=True):
            d.add_heading(h, 2)
            for line in lines:
                d.add_paragraph(line)
        d.save(path)
    elif fmt == "xlsx":
        import openpyxl

        wb = openpyxl.Workbook()
        wb.remove(wb.active)
        for h, lines in zip(headings, parts, strict=True):
            sheet = wb.create_sheet(h)
            sheet.append(["#", "note"])
            for n, line in enumerate(lines, 1):
                sheet.append([n, line])
        wb.save(path)
    elif fmt == "pptx":
        from pptx import Presentation

        p = Presentation()
        for h, lines in zip(headings, parts, strict=True):
            slide = p.slides.add_slide(p.slide_layouts[1])
            slide.shapes.title.text, slide.placeholders[1].text = h, "\n".join(lines)
        p.save(path)
    else:  # mbox, eml
        import mailbox
        from email.message import EmailMessage

        def message(subject: str, lines: list[str], n: int) -> EmailMessage:
            m = EmailMessage()
            m["From"], m["To"], m["Subject"] = "office@example.org", "files@example.org", subject
            m["Date"] = f"Mon, {n + 1} Jun 2026 09:00:00 +0000"
            m.set_content("\n\n".join(lines) + "\n")
            return m

        if fmt == "eml":
            path.write_bytes(message(headings[0], parts[0], 0).as_bytes())
        else:
            box = mailbox.mbox(path)
            for n, (h, lines) in enumerate(zip(headings, parts, strict=True)):
                box.add(message(h, lines, n))
            box.close()
