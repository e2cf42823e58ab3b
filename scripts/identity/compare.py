#!/usr/bin/env python3
"""Compare two hashes.json files (reference vs candidate).

Usage: python compare.py REFERENCE.json CANDIDATE.json

Prints every key that differs, is missing from the candidate, or is new in it; exits 1 if there is
any difference, 0 if both map exactly the same keys to the same hashes.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        ref = json.load(f)
    ref = ref.get("hashes", ref)  # docs/results/output-identity-*.json wraps the hashes with where they came from
    with open(argv[1]) as f:
        new = json.load(f)
    missing = sorted(set(ref) - set(new))
    added = sorted(set(new) - set(ref))
    changed = sorted(k for k in set(ref) & set(new) if ref[k] != new[k])
    for k in changed:
        print(f"DIFFERS  {k}\n         ref {ref[k]}\n         new {new[k]}")
    for k in missing:
        print(f"MISSING  {k}  (in the reference, not in the candidate)")
    for k in added:
        print(f"EXTRA    {k}  (in the candidate, not in the reference)")
    n = len(changed) + len(missing) + len(added)
    if n:
        print(f"{n} difference(s): {len(changed)} differ, {len(missing)} missing, {len(added)} extra "
              f"(of {len(ref)} reference keys)")
        return 1
    print(f"identical: all {len(ref)} keys match")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
