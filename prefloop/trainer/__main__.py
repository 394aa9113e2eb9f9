"""``python -m prefloop.trainer``: the same command as ``prefloop train``."""

from prefloop.trainer.cli import train_command

if __name__ == "__main__":
    train_command(prog_name="python -m prefloop.trainer")
