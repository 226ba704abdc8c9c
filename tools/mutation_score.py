"""Print the mutation score of the last ``make mutate`` run, per file, from mutmut's results.

mutmut 3 keeps one ``mutants/<path>.meta`` JSON per mutated file, mapping each mutant to the
exit code of its test run: 1 (or 3) killed, 0 survived, 33 no test covers it, 36 timeout,
None not run yet. Timeouts and crashes count as detected; mutants not run are left out.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

DETECTED = {1, 3, 36, 24, -24, 152, 255, -9, -11, 37}
SURVIVED = {0}
UNCOVERED = {5, 33}


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutate` first")
        return 1
    total = Counter()
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        run = {k: v for k, v in codes.items() if v is not None}
        if not run:
            continue
        c = Counter(
            "killed" if v in DETECTED else "survived" if v in SURVIVED else "no tests" if v in UNCOVERED else "other"
            for v in run.values()
        )
        total.update(c)
        name = str(meta.relative_to(root)).removesuffix(".meta")
        print(
            f"{name}: {c['killed']}/{len(run)} killed = {100 * c['killed'] / len(run):.1f}% "
            f"(survived {c['survived']}, no tests {c['no tests']}, other {c['other']}; {len(codes) - len(run)} not run)"
        )
        for k, v in sorted(run.items()):
            if v not in DETECTED:
                print(f"    {'survived' if v in SURVIVED else v}: {k}")
    checked = sum(total.values())
    print(f"mutation score: {total['killed']}/{checked} = {100 * total['killed'] / max(checked, 1):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
