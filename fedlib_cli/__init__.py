"""`fedlib`, the command line: runs federations, shows their progress live, manages keys, and
opens the UIs. It drives the flows; nothing in `fedlib/`, `tasks/` or `flows/` imports it."""
