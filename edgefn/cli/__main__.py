"""`python -m edgefn.cli ...`: the same as `edgefn ...`."""

from edgefn.cli.main import app

app()
