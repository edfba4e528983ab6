"""Typed errors raised by attrlab.

Every error that attrlab raises on bad input derives from :class:`AttrlabError`
and says what to do about it. Errors about the *input* (prompts, targets,
sites, indices) also derive from :class:`ValueError` so callers that catch
``ValueError`` keep working; lookup errors derive from :class:`KeyError` or
:class:`IndexError` where that is the natural meaning.

Example:
    >>> import attrlab as al
    >>> try:
    ...     raise al.errors.UnknownMethodError("no method 'foo'")
    ... except al.AttrlabError as e:
    ...     print(type(e).__name__)
    UnknownMethodError
"""

from __future__ import annotations


class AttrlabError(Exception):
    """Base class of every error attrlab raises on purpose."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class InputError(AttrlabError, ValueError):
    """An argument given to attrlab is not acceptable."""


class EmptyPromptError(InputError):
    """The prompt (or one prompt of a batch) is empty."""


class TokenizationError(InputError):
    """Text does not tokenize the way the operation needs."""


class MultiTokenTargetError(TokenizationError):
    """A single-token target was given text that tokenizes to several tokens."""


class TokenOutOfVocabError(InputError):
    """A token id is outside the model's vocabulary."""


class CounterfactualLengthError(InputError):
    """A counterfactual prompt tokenizes to a different length than the prompt."""


class ContextTooLongError(InputError):
    """An input is longer than the model's maximum context."""


class SiteError(AttrlabError, KeyError):
    """A site name is unknown, or the site cannot be used as asked."""


class UnknownSiteError(SiteError):
    """No site of that name exists."""


class SiteNotExposedError(SiteError):
    """The site exists in principle but this model (or its attention
    implementation) does not expose it, or it cannot be written."""


class IndexRangeError(AttrlabError, IndexError):
    """A layer, head, position or row index is out of range."""


class UnsupportedArchitectureError(AttrlabError, TypeError):
    """The model's architecture has no adapter."""


class UnknownMethodError(InputError):
    """No attribution method of that name, or not for that unit kind."""


class UnsupportedAblationError(InputError):
    """This unit kind cannot apply that ablation (e.g. ``Remove`` on heads)."""


class UnknownUnitsError(InputError):
    """No unit kind of that name."""


class FileFormatError(AttrlabError, OSError):
    """A saved attrlab file is corrupt, tampered with, or not an attrlab file."""


class StoreMismatchError(InputError):
    """A feature store was written for another checkpoint, projection, output
    function or dataset than the one it is opened or resumed with."""


# --- store ---
class StoreCorruptError(FileFormatError):
    """A file of a feature store fails its recorded size or checksum, or holds
    non-finite numbers; re-running ``attrlab.data.featurize`` on the store with the
    same arguments recomputes it."""


# --- numerics ---
class NonFiniteError(InputError):
    """A number given to attrlab (a baseline, an option, a target's value) or a
    score it computed is NaN or infinite."""


class QuestionMismatchError(InputError):
    """An evaluation was asked about another prompt, target or units than the
    ones the result explains."""


class UnitMismatchError(QuestionMismatchError):
    """Two results cannot be compared unit by unit: other unit kinds, other label
    columns, duplicated labels, or the same unit labelled with another token."""


class MissingDependencyError(AttrlabError, ImportError):
    """An optional feature needs packages that are not installed; the message
    names the extra to install (e.g. ``pip install 'attrlab[serve]'``)."""


class CounterfactualWarning(UserWarning):
    """The counterfactual does not change the target: effects are all zero."""
