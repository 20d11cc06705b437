"""Markdown for the files clakit writes (model cards, report.md): user-given names and paths as text or code that
cannot break the page: a `|` splits a table cell, a newline ends a row or a line, a backtick ends a code span, and
raw HTML renders as markup."""


def md_text(text: str) -> str:
    """Names and paths as text: markdown renders raw HTML (a model named `<img src=x onerror=...>` became markup in
    a viewer of report.md), so <, > and & become entities; a newline would end the line (or the table row)."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\n", " ").replace("\r", " ")


def md_cell(cell: str) -> str:
    """A model name or path may hold `|` (a column break) or a newline (the row's end): escaped, one cell."""
    return md_text(str(cell).replace("\\", "\\\\").replace("|", "\\|"))


def md_escape(text: str) -> str:
    """Paths and commands as plain markdown text: `_`, `*`, backticks and brackets would format or link them."""
    text = str(text).replace("\\", "\\\\")
    for c in "*_`[]":
        text = text.replace(c, "\\" + c)
    return md_text(text)


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
