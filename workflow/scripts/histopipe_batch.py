# Run one batch job: the same histopipe command for each slide of the batch, in one process,
# stopping at the first slide that fails (its message names the slide's file).
import contextlib
import logging
import sys

from histopipe.cli import main

sm = snakemake  # noqa: F821
rc = 0
with open(sm.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    for argv in sm.params.commands:
        rc = main([str(a) for a in argv])
        if rc:
            break
    logging.shutdown()  # the handlers write to the log file, closed here
    logging.getLogger().handlers.clear()
sys.exit(rc)
