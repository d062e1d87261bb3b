"""Print the requirements that setup.cfg declares, for pip: ``requirements.py install_requires test``.

setup.cfg stays the one place where dependencies are written down.
"""

import configparser
import os
import sys


def main(groups):
    parser = configparser.ConfigParser()
    parser.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
    requirements = []
    for group in groups:
        if group == "install_requires":
            text = parser["options"]["install_requires"]
        else:
            text = parser["options.extras_require"][group]
        requirements += [line.strip() for line in text.splitlines() if line.strip()]
    print(" ".join(f"'{r}'" if " " in r else r for r in (r.replace(" ", "") for r in requirements)))


if __name__ == "__main__":
    main(sys.argv[1:])
