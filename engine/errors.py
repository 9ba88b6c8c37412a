"""Errors the engine raises for bad input: one line each, naming what is wrong and what would be right."""


class EngineError(Exception):
    """Base class: anything the engine rejects with a message meant for a person."""


class ModelLoadError(EngineError):
    """The model folder is missing, incomplete, or lacks the attention layers iSeg reads."""


class InputError(EngineError):
    """A frame, class list or prompt that the method cannot take."""


class SettingsError(EngineError):
    """A method setting out of range or of the wrong kind."""
