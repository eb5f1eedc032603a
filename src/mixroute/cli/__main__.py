"""``python -m mixroute.cli``: the same app as the ``mixroute`` console script."""

from mixroute.cli import app

app(prog_name="mixroute")
