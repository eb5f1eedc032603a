"""The report as data (sections of notes, tables and figures) and its two renderings: one self-contained HTML
file (inline CSS, PNGs as base64 data URIs, no network) and a markdown file with the PNGs beside it."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union


@dataclass
class Note:
    text: str
    warning: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to highlight


@dataclass
class Figure:
    """A PNG; figures sharing a ``group`` are alternatives (one shown at a time, chosen by ``label``)."""

    name: str  # file stem, unique in the report
    png: bytes
    alt: str
    caption: str = ""
    group: Optional[str] = None
    label: str = ""


Block = Union[Note, Table, Figure]


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1a1a1a;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em} .meta{color:#555}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top} th{background:#f0f4f8}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:bold;background:#d7ecff}
caption{caption-side:bottom;text-align:left;color:#555;font-size:.9em;padding-top:.3em}
figure{margin:.8em 0 1.6em} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
.note{background:#f6f6f6;border-left:4px solid #999;padding:.4em .8em;margin:.6em 0}
.warning{background:#fff4e0;border-left:4px solid #D55E00}
.layer-select{margin:.4em 0}
"""

SELECT_JS = """
function mixrouteShow(sel){var g=sel.getAttribute('data-group');
document.querySelectorAll('[data-fig-group="'+g+'"]').forEach(function(el){
el.style.display=(el.getAttribute('data-label')===sel.value)?'':'none';});}
"""


def render_html(title: str, subtitle: str, sections: list[Section], refresh_s: Optional[float] = None) -> str:
    esc = html.escape
    head = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"]
    if refresh_s:
        head.append(f"<meta http-equiv=\"refresh\" content=\"{max(1, int(refresh_s))}\">")
    head.append(f"<style>{CSS}</style><script>{SELECT_JS}</script></head><body>")
    body = [f"<h1>{esc(title)}</h1><p class=\"meta\">{esc(subtitle)}</p>",
            "<nav>" + "".join(f"<a href=\"#{s.anchor}\">{esc(s.title)}</a>" for s in sections) + "</nav>"]
    for s in sections:
        body.append(f"<section id=\"{s.anchor}\"><h2>{esc(s.title)}</h2>")
        body.extend(_html_blocks(s.blocks))
        body.append("</section>")
    return "\n".join(head + body + ["</body></html>\n"])


def _html_blocks(blocks: list[Block]) -> list[str]:
    esc = html.escape
    out: list[str] = []
    seen_groups: set[str] = set()
    for b in blocks:
        if isinstance(b, Note):
            out.append(f"<div class=\"note{' warning' if b.warning else ''}\">{esc(b.text)}</div>")
        elif isinstance(b, Table):
            out.append(_html_table(b))
        elif b.group is None:
            out.append(_html_figure(b))
        elif b.group not in seen_groups:
            seen_groups.add(b.group)
            members = [f for f in blocks if isinstance(f, Figure) and f.group == b.group]
            options = "".join(f"<option value=\"{esc(f.label)}\">{esc(f.label)}</option>" for f in members)
            out.append(f"<div class=\"layer-select\"><label>layer: <select data-group=\"{esc(b.group)}\" "
                       f"onchange=\"mixrouteShow(this)\">{options}</select></label></div>")
            for i, f in enumerate(members):
                hidden = "" if i == 0 else ' style="display:none"'
                out.append(f"<div data-fig-group=\"{esc(b.group)}\" data-label=\"{esc(f.label)}\"{hidden}>"
                           f"{_html_figure(f)}</div>")
    return out


def _html_table(t: Table) -> str:
    esc = html.escape
    rows = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.header) + "</tr>"]
    for i, row in enumerate(t.rows):
        cells = "".join(f"<td{_td_class(c, (i, j) in t.best)}>{esc(c)}</td>" for j, c in enumerate(row))
        rows.append(f"<tr>{cells}</tr>")
    if t.caption:
        rows.insert(1, f"<caption>{esc(t.caption)}</caption>")
    rows.append("</table>")
    return "\n".join(rows)


NUMERIC = re.compile(r"^-?[\d,]*\.?\d+%?$|^-$")


def _td_class(text: str, best: bool) -> str:
    """Numbers right-aligned (``num``), the best of a row highlighted (``best``)."""
    classes = (["num"] if NUMERIC.match(text) else []) + (["best"] if best else [])
    return f" class=\"{' '.join(classes)}\"" if classes else ""


def _html_figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    cap = f"<figcaption>{html.escape(f.caption)}</figcaption>" if f.caption else ""
    return (f"<figure id=\"fig-{html.escape(f.name)}\"><img src=\"data:image/png;base64,{data}\" "
            f"alt=\"{html.escape(f.alt)}\">{cap}</figure>")


def render_markdown(title: str, subtitle: str, sections: list[Section]) -> str:
    """Markdown; figures are referenced as ``NAME.png`` (write them with ``write_pngs``)."""
    out = [f"# {title}", "", subtitle, ""]
    out += [f"- [{s.title}](#{s.anchor})" for s in sections] + [""]
    for s in sections:
        out += [f"<a id=\"{s.anchor}\"></a>", f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Note):
                out += [f"> {'**warning:** ' if b.warning else ''}{b.text}", ""]
            elif isinstance(b, Table):
                out += _md_table(b) + [""]
            else:
                label = f"**{b.label}**: " if b.group else ""
                out += [f"![{b.alt}]({b.name}.png)", ""]
                if b.caption or label:
                    out += [f"{label}{b.caption}", ""]
    return "\n".join(out)


def _md_table(t: Table) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, t.header)) + " |", "|" + "---|" * len(t.header)]
    for i, row in enumerate(t.rows):
        lines.append("| " + " | ".join(f"**{cell(c)}**" if (i, j) in t.best and c else cell(c)
                                       for j, c in enumerate(row)) + " |")
    if t.caption:
        lines += ["", f"*{t.caption}*"]
    return lines


def figures(sections: list[Section]) -> list[Figure]:
    return [b for s in sections for b in s.blocks if isinstance(b, Figure)]


def write_pngs(sections: list[Section], out: Path) -> list[Path]:
    paths = []
    for f in figures(sections):
        p = out / f"{f.name}.png"
        p.write_bytes(f.png)
        paths.append(p)
    return paths
