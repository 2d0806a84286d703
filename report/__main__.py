"""`python -m report ...`: the command line of report/cli.py."""

import engine
from report import cli

engine.run_main(cli.main)
