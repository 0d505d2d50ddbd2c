"""Score models shipped with the package (JSON, made by `matcher calibrate`), one per model pack."""
