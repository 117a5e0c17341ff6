"""Figures about vitexp's own code: modules and lines, `# fmt: skip` markers, the longest functions as `ruff format`
writes them, and the names each trainer setting goes by.

    python -m vitexp.bench.code_stats [--root .]
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

TRAINER_KEYS = (
    "max_epochs",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "ckpt_every_n_epochs",
    "ckpt_every_n_steps",
    "ckpt_every_n_minutes",
    "limit_train_batches",
    "limit_val_batches",
    "skip_nonfinite",
    "ema_decay",
    "precision",
    "compile_mode",
)

# the names trainer settings were given in code besides their own
ALIASES = (
    "accumulate",
    "clip_norm",
    "ckpt_every",
    "ckpt_every_steps",
    "ckpt_every_minutes",
    "fp16_scaler",
    "log_every",
)


def functions(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from its first decorator or `def` to its last line) of every function in `path`."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                found.append((f"{prefix}{child.name}", child.end_lineno - start + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return found


def formatted_copy(root: Path, tmp: Path) -> Path:
    """vitexp/ copied to `tmp` with every `# fmt: skip` removed and formatted by ruff, as the formatter would own it."""
    copy = tmp / "vitexp"
    shutil.copytree(root / "vitexp", copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", tmp / "pyproject.toml")
    for path in copy.rglob("*.py"):
        path.write_text(re.sub(r"\s*# fmt: skip", "", path.read_text()))
    subprocess.run(["ruff", "format", "-q", str(copy)], check=True, cwd=tmp)
    return copy


def trainer_names(root: Path) -> dict[str, list[str]]:
    """For each trainer setting, the files (vitexp/, conf/) that write its name out as an identifier or key."""
    paths = [p for p in root.glob("vitexp/**/*.py") if p.name != Path(__file__).name] + [*root.glob("conf/**/*.yaml")]
    texts = {p: p.read_text() for p in paths}
    return {
        key: sorted(str(p.relative_to(root)) for p, text in texts.items() if re.search(rf"\b{key}\b", text))
        for key in TRAINER_KEYS
    }


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--limit", type=int, default=60, help="list functions longer than this")
    args = parser.parse_args()
    root = args.root.resolve()
    modules = sorted(root.glob("vitexp/**/*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in modules)
    skips = sum(len(re.findall(r"# fmt: skip$", p.read_text(), flags=re.MULTILINE)) for p in modules)
    print(f"modules {len(modules)}  lines {lines}  fmt-skip markers {skips}")
    with tempfile.TemporaryDirectory() as tmp:
        copy = formatted_copy(root, Path(tmp))
        long = [
            (n, f"{p.relative_to(copy.parent)}:{name}")
            for p in sorted(copy.rglob("*.py"))
            for name, n in functions(p)
            if n > args.limit
        ]
    print(f"functions over {args.limit} lines as ruff formats them: {len(long)}")
    for n, where in sorted(long, reverse=True):
        print(f"  {n:4d}  {where}")
    print("files that name each trainer setting:")
    for key, where in trainer_names(root).items():
        print(f"  {key:24s} {len(where)}  {' '.join(where)}")
    texts = [p.read_text() for p in modules if p.name != Path(__file__).name]
    renamed = {a: sum(len(re.findall(rf"\b{a}\b", t)) for t in texts) for a in ALIASES}
    print("renamed copies of trainer settings in vitexp/ (occurrences):", renamed)


if __name__ == "__main__":
    main()
