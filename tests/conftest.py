import pytest
from click.testing import CliRunner


@pytest.fixture
def cli_run():
    """Invoke the recengine CLI in-process; returns the click Result."""
    from recengine.cli import cli

    def run(*args: str):
        return CliRunner().invoke(cli, list(args))

    return run
