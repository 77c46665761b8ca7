"""Exit non-zero unless the active environment holds exactly the versions pinned in constraints.txt."""
import re
import sys
from importlib.metadata import distributions


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


lock = {norm(m[1]): m[2] for line in open("constraints.txt") if (m := re.match(r"([^#=\s-][^=\s]*)==(\S+)", line))}
got = {norm(d.metadata["Name"]): d.version for d in distributions()}
off = [f"{n} {got[n]} (lock {v})" for n, v in lock.items() if n in got and got[n] != v]
extra = [f"{n} {got[n]} (not in the lock)" for n in got
         if n not in lock and n not in ("pip", "setuptools", "wheel", "torch", "unitok-mllm")]
if off or extra:
    sys.exit("installed set differs from constraints.txt: " + "; ".join(off + extra))
print(f"installed set == constraints.txt ({len(lock)} packages pinned)")
