"""``appliance-passwd [--stdin] NAME``: the line that lets NAME sign in to the web pages.

Asks for the password twice (or reads one line from standard input with ``--stdin``) and prints
``NAME = "scrypt$..."``, to put under ``[web.users]`` in the configuration.  The password itself is never
printed or stored.  Exit status 0; 2 for a bad name, an empty password or two that differ.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from typing import List, Optional

from ..web.auth import hash_password

#: Shortest password accepted.
MIN_LENGTH = 8


def main(argv: Optional[List[str]] = None, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = argparse.ArgumentParser(prog="appliance-passwd",
                                     description="Make the [web.users] line that lets NAME sign in to the web pages.")
    parser.add_argument("--stdin", action="store_true", help="read the password from standard input (one line)")
    parser.add_argument("name", help="the user's name (1-64 letters, digits, '.', '_', '@' or '-')")
    args = parser.parse_args(argv)
    if not re.match(r"^[A-Za-z0-9_.@-]{1,64}$", args.name):
        print("appliance-passwd: a user name is 1-64 letters, digits, '.', '_', '@' or '-'", file=stderr)
        return 2
    if args.stdin:
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("appliance-passwd: the two passwords differ", file=stderr)
            return 2
    if len(password) < MIN_LENGTH:
        print(f"appliance-passwd: a password has at least {MIN_LENGTH} characters", file=stderr)
        return 2
    print(f'{args.name} = "{hash_password(password)}"', file=stdout)
    print("# put this line under [web.users] in the configuration, then restart the appliance", file=stderr)
    return 0


def entry_point() -> None:
    """The ``appliance-passwd`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
