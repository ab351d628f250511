"""One self-contained HTML page per command (eda, study, report): figures embedded as base64 PNG,
tables as HTML, no external files or scripts, so the page opens offline and can be mailed as is.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lowres_birds.run_dir import write_text

if TYPE_CHECKING:
    import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
.scroll { overflow: auto; max-height: 90vh; border: 1px solid #ddd; } img.full { max-width: none; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""
FULL_SIZE_WIDTH = 2000  # wider figures (confusion matrices of many classes) scroll at full size instead of shrinking


@dataclass
class Section:
    """A heading followed by items in order: str (paragraph), Path (PNG figure) or DataFrame (table)."""

    title: str
    items: list[str | Path | pd.DataFrame] = field(default_factory=list)


def _item_html(item: str | Path | pd.DataFrame) -> str:
    if hasattr(item, "to_html"):  # a DataFrame (pandas is imported only by the commands that make tables)
        if item.empty:
            return "<p>(none)</p>"
        return item.to_html(index=False, float_format=_number, border=0, na_rep="")
    if isinstance(item, Path):
        data = item.read_bytes()
        tag = (
            f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(item.name)}"'
        )
        if int.from_bytes(data[16:20], "big") > FULL_SIZE_WIDTH:  # PNG header width: keep small labels readable
            return f'<div class="scroll">{tag} class="full"></div>'
        return tag + ">"
    text = html.escape(item)
    return f"<pre>{text}</pre>" if "\n" in item else f"<p>{text}</p>"


def write_page(path: Path, title: str, sections: list[Section], intro: str = "") -> Path:
    """Write the page atomically (temporary file, then rename) and return its path."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        body.append(_item_html(intro))
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body.extend(_item_html(item) for item in section.items)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return write_text(path, page)


def _number(value: float) -> str:
    """4 significant digits, never in exponent notation; NaN as an empty cell."""
    if value != value:
        return ""
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown would need the extra tabulate package)."""

    def cell(value: object) -> str:
        return _number(value) if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"
