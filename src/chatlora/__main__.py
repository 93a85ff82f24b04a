"""`python -m chatlora ...` is the same as the `chatlora` command."""

from chatlora.cli import main

raise SystemExit(main())
