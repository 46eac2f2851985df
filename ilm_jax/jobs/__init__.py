"""One module per job: ``run(config, workdir)``."""
