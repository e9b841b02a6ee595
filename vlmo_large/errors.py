"""The one exception type for problems a user can fix (a config key, a file, a checkpoint, a
layout). The launchers print its message as one line `error: ...` and exit with status 2, at any
point of a run; every other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message is one line naming the key, file, shard or step."""
