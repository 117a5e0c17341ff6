"""One module per task, each with a `run(cfg) -> results` recipe."""
