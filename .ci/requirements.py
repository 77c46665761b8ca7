"""Print setup.py's install_requires, one per line; with --unpin NAME..., those packages without a version range
(so pip takes their newest release). Used by .ci/newest-smoke. Reads setup.py's syntax tree (nothing is run)."""
import ast
import re
import sys
from pathlib import Path

tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
requires = next(ast.literal_eval(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                for kw in node.keywords if kw.arg == "install_requires")
unpin = set(sys.argv[2:]) if sys.argv[1:2] == ["--unpin"] else set()
for req in requires:
    name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
    print(name if name in unpin else req)
