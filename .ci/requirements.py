"""Print setup.py's install_requires, one per line; with --unpin NAME..., those packages without a version range
(so pip takes their newest release). Used by .ci/newest-smoke."""
import sys
from pathlib import Path
from unittest import mock

import setuptools

root = Path(__file__).resolve().parents[1]
with mock.patch.object(setuptools, "setup") as setup:
    exec(compile((root / "setup.py").read_text(), "setup.py", "exec"), {"__file__": str(root / "setup.py")})
unpin = set(sys.argv[2:]) if sys.argv[1:2] == ["--unpin"] else set()
for req in setup.call_args.kwargs["install_requires"]:
    name = req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
    print(name if name in unpin else req)
