"""``python -m distill``: the CLI, also for launchers that take a module (``torchrun -m distill train job.yaml``)."""

from distill.cli import main

main()
