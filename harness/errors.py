"""User-facing errors: the CLI turns these into one clear line and exit code 2."""

from __future__ import annotations

from models.files import InputError


class UserError(InputError):
    """A mistake in the user's input (path, file content, argument).

    The message must name the file, image id, segment id or key at fault. The CLI prints it
    as one line (no traceback) and exits with status 2. (``models`` raises the same kind of
    mistake as :class:`models.files.InputError` subclasses, which the CLI treats alike.)
    """


class DataError(UserError):
    """A data set on disk violates the COCO panoptic format (names file and id)."""
