"""The README's backend option tables, written from the backends' declared `Options` models.

`python -m backends.docs` rewrites every block between `<!-- options:NAME -->` and
`<!-- /options:NAME -->` in README.md with `option_table` of backend NAME's options;
`python -m backends.docs --check` changes nothing and exits 1 naming the stale blocks (the test
suite runs the same check, so a changed option or description cannot leave the README behind).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from backends.options import option_table
from backends.registry import sampler_class

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- options:(\w+) -->\n)(.*?)(<!-- /options:\2 -->)", re.DOTALL)


def table(name: str) -> str:
    """The markdown table of backend `name`'s declared options."""
    return option_table(sampler_class(name).Options)


def blocks(text: str) -> dict[str, str]:
    """Backend name -> the table text currently between its markers."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def render(text: str) -> str:
    """`text` with every option block rewritten from the declarations."""
    return BLOCK.sub(lambda m: f"{m.group(1)}{table(m.group(2))}\n{m.group(4)}", text)


def stale(text: str) -> list[str]:
    """Names of the backends whose block differs from their declarations."""
    return [name for name, body in blocks(text).items() if body != table(name) + "\n"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.docs", description=__doc__)
    parser.add_argument("readme", nargs="?", type=Path, default=README)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a table differs from the declarations; write nothing")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    if args.check:
        behind = stale(text)
        if behind:
            print(f"{args.readme}: option tables of {behind} differ from the backends' "
                  "declarations; run `python -m backends.docs`", file=sys.stderr)
            return 1
        return 0
    new = render(text)
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: {len(blocks(new))} option tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
