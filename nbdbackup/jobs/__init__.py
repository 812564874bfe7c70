"""`nbdbackup run JOBFILE`: a fleet of sources in one TOML job file.

jobfile reads and checks the file (every error before anything runs, with its line),
runner runs each source as a child `nbdbackup ... --json` process, metrics writes the
Prometheus textfile-collector file. docs/jobs.md is the reference.
"""
