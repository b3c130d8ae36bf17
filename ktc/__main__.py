from ktc.cli import entry

entry()
