"""Tools run beside the recipe: the benchmark and an offline visdom server (python -m tools.NAME)."""
