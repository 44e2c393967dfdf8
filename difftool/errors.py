class UserError(Exception):
    """Bad input from the user: printed as one line with its remedy, exit code 2."""
