"""Workstation subcommands of ``hemaedge`` (each: ``configure(parser)``, ``run(args)``)."""
