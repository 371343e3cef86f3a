"""The `retrieval` command's subcommands, one module each (`retrieval.cli` dispatches): serve, query,
demo, and the model workflows. Each module adds its parser and runs it; none holds logic that a
library user would need."""
