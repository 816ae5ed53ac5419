"""Tasks and their rows: sources, cleaning, the DataModule, and how held-out rows are scored and reported."""
