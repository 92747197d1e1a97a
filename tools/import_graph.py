"""The layers of kfine's modules, from their imports: python tools/import_graph.py [--check FILE]

Reads every kfine/*.py with ``ast`` (nothing is imported), collects which kfine modules each one
imports at import time (imports inside functions are calls made late, left out), and prints the modules in layers: layer 0 imports no
other kfine module, layer n imports only modules of layers below n. The output is a Markdown
table plus a mermaid graph, the block docs/architecture.md embeds between its
``<!-- import-graph -->`` markers. ``--check FILE`` exits 1 when FILE's block differs from the
code (tests/test_docs.py runs it), ``--write FILE`` replaces the block.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- import-graph -->", "<!-- /import-graph -->"


def _top_level(tree):
    """The statements that run when the module is imported (not those inside functions)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
        for h in getattr(node, "handlers", []):
            todo += h.body


def imports(package: Path = ROOT / "kfine") -> dict[str, set[str]]:
    """{module: the kfine modules it imports when it is imported}, for every module of the
    package. Imports inside functions (kept there to load TensorFlow or Keras only when needed)
    are left out: they are calls, not layers."""
    mods = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    out = {}
    for m in sorted(mods):
        tree = ast.parse((package / f"{m}.py").read_text())
        deps = set()
        for node in _top_level(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "kfine":
                    deps |= {a.name for a in node.names if a.name in mods}
                elif node.module.startswith("kfine."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names
                         if a.name.startswith("kfine.") and a.name.split(".")[1] in mods}
        out[m] = deps & mods - {m}
    return out


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 for no kfine import, else 1 + the highest layer it imports.
    Modules in an import cycle share the cycle's layer."""
    level: dict[str, int] = {}
    remaining = dict(graph)
    while remaining:
        ready = [m for m, d in remaining.items() if d <= set(level)]
        if not ready:   # a cycle: place its member with the fewest unplaced imports
            m = min(remaining, key=lambda k: (len(remaining[k] - set(level)), k))
            ready = [m]
        for m in ready:
            deps = [level[d] for d in graph[m] if d in level]
            level[m] = 1 + max(deps) if deps else 0
            del remaining[m]
    return level


def render(graph: dict[str, set[str]]) -> str:
    level = layers(graph)
    lines = [START, "", "| layer | modules (each imports only modules of the layers above it in this table) |",
             "|---:|---|"]
    for n in range(max(level.values()) + 1):
        lines.append(f"| {n} | {', '.join(f'`{m}`' for m in sorted(m for m in level if level[m] == n))} |")
    lines += ["", "```mermaid", "graph BT"]
    for m in sorted(graph, key=lambda k: (level[k], k)):
        for d in sorted(graph[m], key=lambda k: (level[k], k)):
            lines.append(f"  {m} --> {d}")
    lines += ["```", "", END]
    return "\n".join(lines)


def block_of(text: str) -> str | None:
    if START not in text or END not in text:
        return None
    return text[text.index(START): text.index(END) + len(END)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(imports())
    if len(argv) == 2 and argv[0] in ("--check", "--write"):
        path = Path(argv[1])
        doc = path.read_text()
        old = block_of(doc)
        if argv[0] == "--write":
            path.write_text(doc.replace(old, text) if old else doc + "\n" + text + "\n")
            return 0
        if old != text:
            print(f"{path}: the import graph is out of date; run python tools/import_graph.py --write {path}")
            return 1
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
