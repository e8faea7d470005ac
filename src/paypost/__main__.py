"""`python -m paypost …` is the `paypost` command."""

from paypost.cli import main

main()
