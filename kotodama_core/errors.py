"""The one base class of the errors a user can fix: bad config, input, checkpoint or data.

Command lines print such an error as one line (`error: …`, naming the file and key at fault) and exit 2;
anything else is a bug and keeps its traceback. `--debug` shows the traceback of a UserError too.
"""

from __future__ import annotations


class UserError(Exception):
    """A fault in what the user gave (a config, a file, an input), with a message that names it."""
