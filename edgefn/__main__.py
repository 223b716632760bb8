from edgefn.cli import app

app()
