"""`python -m edgefn ...`: the same as `edgefn ...`."""

from edgefn.cli.main import app

app()
