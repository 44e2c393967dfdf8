"""Generated bad input for every command (see conftest.py)."""
