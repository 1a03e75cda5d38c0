"""Example daemons users copy from; a package only so that type checkers tell the examples apart."""
