# Run a histopipe command whose many inputs go through a list file, so that a cohort of
# thousands of slides never meets the shell's command-length limit.
import contextlib
import logging
import os
import sys
import tempfile

from histopipe.cli import main

sm = snakemake  # noqa: F821
# params.list_columns: one list of paths per column (per-slide paths, some inside batch folders).
columns = sm.params.list_columns
with open(sm.log[0], "w") as log, tempfile.NamedTemporaryFile("w", suffix=".txt") as lst:
    # Absolute paths: the list file lives in the temp folder, not in the working directory.
    lst.write("".join("\t".join(map(os.path.abspath, map(str, row))) + "\n" for row in zip(*columns, strict=True)))
    lst.flush()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = main([*map(str, sm.params.args), sm.params.list_flag, lst.name])
        logging.shutdown()  # the handlers write to the log file, closed below
        logging.getLogger().handlers.clear()
sys.exit(rc)
