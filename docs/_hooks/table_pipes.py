"""mkdocs hook: a pipe escaped inside a code span of a table row (`nf4\\|fp4`) renders as `|`.

GitHub needs the escape (it splits table cells on every unescaped pipe, code spans
included); Python-Markdown's tables never split inside a code span and would show the
backslash. The pages keep GitHub's form; this unescapes it for the site only.
"""

from __future__ import annotations

import re
from typing import Any

CODE_SPAN = re.compile(r"`[^`\n]*`")


def on_page_markdown(markdown: str, **_: Any) -> str:
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("|"):
            lines[i] = CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)
    return "\n".join(lines)
