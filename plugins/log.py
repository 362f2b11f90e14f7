"""``self.plugins.log``: logging tagged with the actor and its message sequence.

Lines are written at once, not buffered: a log of a rolled-back message is still
useful to whoever debugs it, and the ``seq`` tag tells which message wrote it
(the seq the message would commit as). Every record carries ``actor`` and
``seq`` attributes, which the JSON log format of ``troth serve`` emits as fields.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from troth.core.names import ActorName
from troth.core.plugin import ActorPlugin, PluginContext, PluginFactory

_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: str = "INFO"

    def model_post_init(self, _context: Any) -> None:
        if self.level.upper() not in _LEVELS:
            raise ValueError(f"level must be one of {sorted(_LEVELS)}")


class ActorLog(ActorPlugin):
    groupable: ClassVar[bool] = True  # it writes log lines, and reads nothing

    def __init__(self, actor: ActorName, pstate: dict[str, Any], logger: logging.Logger) -> None:
        super().__init__(actor, pstate)
        self._logger = logger

    def _log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        seq = self.txn.seq if self.txn else None
        extra = {"actor": str(self.actor), "seq": seq, **kwargs.pop("extra", {})}
        self._logger.log(level, f"[{self.actor}#{seq}] {msg}", *args, extra=extra, **kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(logging.ERROR, msg, *args, **kwargs)


class LogFactory(PluginFactory):
    name: ClassVar[str] = "log"
    settings_model = LogSettings

    def __init__(self, context: PluginContext, settings: dict[str, Any]) -> None:
        super().__init__(context, settings)
        self._loggers: dict[str, logging.Logger] = {}

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        logger = self._loggers.get(actor.type)
        if logger is None:  # once per type: setLevel clears the logging module's caches
            logger = self._loggers[actor.type] = logging.getLogger(f"troth.core.actor.{actor.type}")
            logger.setLevel(self.settings.level.upper())
        return ActorLog(actor, pstate, logger)
