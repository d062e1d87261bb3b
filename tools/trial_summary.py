"""Sum up trial logs (and the package test's) into one closing line: 'total: N passed, N failed, N skipped'.

trial ends a run with 'PASSED (skips=2, successes=40)' or
'FAILED (failures=1, errors=2, successes=37)'; a log without such a line
means the run did not finish, which counts as a failure.
"""

import re
import sys


def summarize(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        plain = re.match(r"^[\w-]+: (\d+) passed, (\d+) failed$", line.strip())  # tools/package_test.sh's line
        if plain:
            return int(plain.group(1)), int(plain.group(2)), 0
        match = re.match(r"^(PASSED|FAILED) \((.*)\)$", line.strip())
        if match:
            counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2)))
            passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
            failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
            return passed, failed, counts.get("skips", 0)
    return None


def main(paths):
    total = [0, 0, 0]
    ok = True
    for path in paths:
        result = summarize(path)
        if result is None:
            print(f"{path}: the trial run did not finish")
            ok = False
            continue
        print(f"{path}: {result[0]} passed, {result[1]} failed, {result[2]} skipped")
        total = [a + b for a, b in zip(total, result)]
        ok = ok and result[1] == 0 and result[0] > 0
    print(f"total: {total[0]} passed, {total[1]} failed, {total[2]} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
