"""The recipe files, shipped inside the package so `unizoo` finds them when installed from a wheel."""
