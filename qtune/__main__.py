from qtune.cli import entry_point

entry_point()
