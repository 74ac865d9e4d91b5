"""One self-contained HTML page: inline CSS, images as base64 PNG data URIs, no JavaScript.

The page opens from anywhere (e-mail it, attach it to a Kaggle dataset):
nothing outside the file is referenced. Helpers return HTML fragments;
`page` assembles the sections, a table of contents and a header.
"""
from __future__ import annotations

import base64
import html as _html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

CSS = """
:root { --ink:#1f2933; --muted:#5f6b7a; --line:#e3e7ee; --bg:#f5f7fa; --card:#ffffff;
        --blue:#3467b0; --orange:#e07b39; --note:#fff8e6; --note-line:#f0c36d; --bad:#fdecea; --bad-line:#e57373; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:linear-gradient(120deg,#1d3557,#3467b0); color:#fff; padding:28px 0 22px; }
header .wrap { display:flex; flex-direction:column; gap:6px; }
header h1 { margin:0; font-size:26px; font-weight:650; letter-spacing:.2px; }
header p { margin:0; color:#dbe6f5; font-size:13.5px; }
header code { background:rgba(255,255,255,.14); color:#fff; }
.wrap { max-width:1180px; margin:0 auto; padding:0 28px; }
nav.toc { background:var(--card); border-bottom:1px solid var(--line); position:sticky; top:0; z-index:2; }
nav.toc ol { list-style:none; display:flex; flex-wrap:wrap; gap:4px 18px; margin:0; padding:10px 0; font-size:13.5px; }
nav.toc a { color:var(--blue); text-decoration:none; }
nav.toc a:hover { text-decoration:underline; }
nav.toc .missing a { color:var(--muted); }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(170px,1fr)); gap:12px; margin:22px 0 6px; }
.kpi { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px; }
.kpi .v { font-size:22px; font-weight:650; }
.kpi .k { color:var(--muted); font-size:12.5px; }
section.card { background:var(--card); border:1px solid var(--line); border-radius:12px;
               margin:22px 0; padding:22px 26px 18px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
section.card h2 { margin:0 0 4px; font-size:20px; }
section.card h2 .num { color:var(--muted); font-weight:500; margin-right:6px; }
section.card h3 { margin:18px 0 6px; font-size:15.5px; }
p.lead { margin:2px 0 14px; color:var(--muted); max-width:900px; }
figure { margin:12px 0 18px; }
figure img { display:block; max-width:100%; height:auto; border:1px solid var(--line); border-radius:8px; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
table.data { border-collapse:collapse; font-size:13px; margin:8px 0 16px; font-variant-numeric:tabular-nums; }
table.data th, table.data td { padding:5px 11px; border-bottom:1px solid var(--line); text-align:right; }
table.data th { background:#f0f3f8; color:#334155; font-weight:600; vertical-align:bottom; }
table.data td.txt, table.data th.txt { text-align:left; }
table.data tr.group td { border-top:2px solid #cfd6e1; }
table.data td.best { font-weight:700; color:#1b5e20; }
.scroll { overflow-x:auto; }
.note { background:var(--note); border:1px solid var(--note-line); border-radius:8px; padding:9px 13px;
        margin:10px 0; font-size:14px; }
.note.error { background:var(--bad); border-color:var(--bad-line); }
.note b { margin-right:4px; }
code { background:#eef2f7; padding:1px 5px; border-radius:4px; font-size:12.5px;
       font-family:"SFMono-Regular", Menlo, Consolas, monospace; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:18px; }
@media (max-width:900px) { .grid2 { grid-template-columns:1fr; } }
footer { color:var(--muted); font-size:12.5px; padding:10px 0 40px; }
"""


def esc(text) -> str:
    return _html.escape(str(text), quote=True)


def code_spans(text: str) -> str:
    """Escape text, turning `backquoted` parts into <code>."""
    parts = str(text).split("`")
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def figure(png: Path, caption: str = "", alt: str = "", attrs: dict | None = None) -> str:
    cap = f"<figcaption>{code_spans(caption)}</figcaption>" if caption else ""
    extra = "".join(f' {esc(k)}="{esc(v)}"' for k, v in (attrs or {}).items())
    alt = alt or Path(png).stem.replace("_", " ")
    return f'<figure{extra}><img src="{data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


def note(text: str, error: bool = False) -> str:
    kind = "Could not draw:" if error else "Not available:"
    return f'<div class="note{" error" if error else ""}"><b>{kind}</b>{code_spans(text)}</div>'


def paragraph(text: str) -> str:
    return f"<p>{code_spans(text)}</p>"


def heading(text: str) -> str:
    return f"<h3>{esc(text)}</h3>"


def _fmt(v, digits: int) -> str:
    if hasattr(v, "item"):  # numpy scalar -> Python
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return esc(v)


def table(df: pd.DataFrame, *, digits: int | dict = 4, index: bool = True, best_low: list[str] | None = None,
          best_high: list[str] | None = None, group_by: str | None = None, caption: str = "") -> str:
    """A DataFrame as an HTML table; the best value of best_low/best_high columns (per group) in bold.

    digits: decimals of float columns, one number or {column: decimals} (default 4).
    Integer columns print as integers, NaN as a dash.
    """
    df = (df.reset_index() if index else df).reset_index(drop=True)
    text_cols = {c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])}
    best = set()
    groups = df.groupby(group_by, sort=False).groups.values() if group_by else [df.index]
    for rows in groups:
        sub = df.loc[rows]
        for cols, fn in ((best_low or [], "idxmin"), (best_high or [], "idxmax")):
            for c in cols:
                if c in sub and sub[c].notna().sum() > 1:
                    best.add((getattr(sub[c].astype(float), fn)(), c))
    head = "".join(f'<th class="{"txt" if c in text_cols else ""}">{esc(c)}</th>' for c in df.columns)
    body = []
    for i in range(len(df)):
        new_group = group_by is not None and (i == 0 or df[group_by].iloc[i] != df[group_by].iloc[i - 1])
        cells = []
        for c in df.columns:
            v = df[c].iloc[i]
            if group_by is not None and c == group_by and not new_group:
                v = ""
            klass = " ".join(k for k, on in (("txt", c in text_cols), ("best", (i, c) in best)) if on)
            d = digits.get(c, 4) if isinstance(digits, dict) else digits
            cells.append(f'<td class="{klass}">{_fmt(v, d)}</td>')
        cls = ' class="group"' if new_group and i > 0 else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    cap = f"<figcaption>{code_spans(caption)}</figcaption>" if caption else ""
    return (f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{cap}')


@dataclass
class Section:
    id: str
    title: str
    lead: str                    # one or two sentences: what to look for
    blocks: list[str] = field(default_factory=list)
    status: str = "ok"           # ok | partial | missing | error

    def render(self, number: int) -> str:
        return (f'<section class="card" id="{esc(self.id)}" data-status="{esc(self.status)}">'
                f'<h2><span class="num">{number}.</span>{esc(self.title)}</h2>'
                f'<p class="lead">{code_spans(self.lead)}</p>{"".join(self.blocks)}</section>')


def page(title: str, subtitle_lines: list[str], kpis: list[tuple[str, str]], sections: list[Section],
         footer: str = "") -> str:
    toc = "".join(f'<li class="{"missing" if s.status in ("missing", "error") else ""}">'
                  f'<a href="#{esc(s.id)}">{i}. {esc(s.title)}</a></li>' for i, s in enumerate(sections, 1))
    cards = "".join(f'<div class="kpi"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
                    for k, v in kpis)
    subtitle = "".join(f"<p>{code_spans(line)}</p>" for line in subtitle_lines)
    body = "".join(s.render(i) for i, s in enumerate(sections, 1))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header><div class="wrap"><h1>{esc(title)}</h1>{subtitle}</div></header>
<nav class="toc"><div class="wrap"><ol>{toc}</ol></div></nav>
<main class="wrap">
<div class="cards">{cards}</div>
{body}
</main>
<footer><div class="wrap">{code_spans(footer)}</div></footer>
</body>
</html>
"""
