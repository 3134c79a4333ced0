"""Train and evaluate the learned edge router (a leaf: only the command line imports it)."""
