"""Markdown for the files clakit writes (model cards, report.md): user-given names and paths as text or code that
cannot break the page: a `|` splits a table cell, a newline ends a row or a line, a backtick ends a code span, and
raw HTML renders as markup."""

import re

# markdown's inline markup (a backslash first: it escapes the others): a model named `**b**` or `![x](plot.png)`
# rendered bold or as an image in report.md's table; `~` is GFM's strikethrough. `_` apart (EDGE_UNDERSCORE).
MARKUP = "\\*`[]~"
# an underscore at a word's edge (`_it_`) may open or close emphasis; one inside a word (tiny_llama, lr_1e-4) never
# does in CommonMark, and stays as written (readable in the file, as a reader greps it)
EDGE_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")
# control characters (C0 but tab/newline/CR, DEL, C1) and the bidirectional overrides/isolates/marks: a NUL made
# report.md a "binary file" to grep and is a parse error in HTML, an ESC sequence recolours a terminal that cats the
# file, and U+202E shows a table cell's text reversed (a name that reads as another)
INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """`text` with its control and bidirectional-formatting characters shown as escapes (\\x00, \\u202e)."""
    return INVISIBLE.sub(lambda m: ascii(m.group())[1:-1], str(text))


def md_text(text: str) -> str:
    """Names, paths and notes as text, never markup: markdown's inline markup characters are backslash-escaped, and
    raw HTML (a model named `<img src=x onerror=...>` became markup in a viewer of report.md) becomes entities (<, >
    and &); a newline would end the line (or the table row)."""
    text = visible(text)
    for c in MARKUP:
        text = text.replace(c, "\\" + c)
    text = EDGE_UNDERSCORE.sub(r"\\_", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\n", " ").replace("\r", " ")


def md_cell(cell: str) -> str:
    """A table cell: text (md_text), whose `|` (a column break even inside code, in GFM) is escaped too."""
    return md_text(cell).replace("|", "\\|")


def md_code(text: str, table: bool = True) -> str:
    """`text` as one inline code span on one line: line ends shown as \\n and \\r (a path or command holding one
    ended the card's table row), the span fenced by more backticks than any run inside it (CommonMark), padded where
    it starts or ends with a backtick or a space (one space each side is stripped). `table`: in a table cell, where
    GFM splits cells at `|` even inside code, so it is escaped (elsewhere the backslash would show)."""
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    if table:
        text = text.replace("|", "\\|")
    if not text.strip(" "):  # CommonMark strips nothing from a span of spaces alone; "``" is no span: shown as is
        return f"`{text or ' '}`"
    longest, run = 0, 0
    for c in text:
        run = run + 1 if c == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
