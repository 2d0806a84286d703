"""`python -m report ...`: the command line of report/cli.py."""

import console.cli
from report import cli

console.cli.run_main(cli.main)
