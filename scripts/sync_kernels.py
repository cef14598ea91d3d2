"""Copy the kernel layer (modeling/attention.py) into every self-contained modeling file.

Each ``modeling/modeling_*.py`` carries the kernel layer between two marker lines so that it can be
copied alone into a Hub repo or over an original checkpoint's modeling file. Edit only
``modeling/attention.py``, then run this script; ``--check`` (run by CI) fails when any copy differs.

    python scripts/sync_kernels.py            # rewrite the copies
    python scripts/sync_kernels.py --check    # exit 1 if a copy is stale
    python scripts/sync_kernels.py --file modeling/modeling_bloom.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "modeling" / "attention.py"
BEGIN = "# >>> kernel layer: copied from modeling/attention.py by scripts/sync_kernels.py; edit it there >>>"
END = "# <<< kernel layer <<<"


def modeling_files() -> list[Path]:
    return sorted((ROOT / "modeling").glob("modeling_*.py"))


def kernel_block() -> str:
    return SOURCE.read_text(encoding="utf-8").rstrip("\n") + "\n"


def with_kernel_block(text: str, block: str, path: Path) -> str:
    """Return ``text`` with everything between the marker lines replaced by ``block``."""
    lines = text.splitlines(keepends=True)
    stripped = [line.rstrip("\n") for line in lines]
    if stripped.count(BEGIN) != 1 or stripped.count(END) != 1:
        raise SystemExit(f"{path}: needs exactly one '{BEGIN}' line and one '{END}' line")
    start, stop = stripped.index(BEGIN), stripped.index(END)
    if stop < start:
        raise SystemExit(f"{path}: the end marker comes before the begin marker")
    return "".join(lines[: start + 1]) + block + "".join(lines[stop:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale copies (exit 1 if any)")
    parser.add_argument("--file", action="append", type=Path, help="limit to these modeling files")
    args = parser.parse_args(argv)

    block = kernel_block()
    paths = [p.resolve() for p in args.file] if args.file else modeling_files()
    stale = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        updated = with_kernel_block(text, block, path)
        if updated == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(updated, encoding="utf-8")
    for path in stale:
        verb = "is stale" if args.check else "updated"
        print(f"{path.relative_to(ROOT)} {verb}")
    if args.check and stale:
        print("run: python scripts/sync_kernels.py", file=sys.stderr)
        return 1
    print(f"{len(paths)} modeling file(s) checked against {SOURCE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
