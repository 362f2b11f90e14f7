"""``self.plugins.send``: messages to other actors, through the outbox.

``tell(target, method, *args, **kwargs)`` buffers a message; it is committed with
the sender's state and delivered after the commit, **at least once**, with a
message id that the receiver uses as the call's ``request_id``. The receiver's
committed-reply cache turns redeliveries into no-ops, so each message is
**processed once**. Messages from one sender to one receiver are processed in
commit order as long as no delivery needs a retry.

``on_result="method"`` hands the receiver's reply (or its error) back to the
sender as a call of ``method(result)`` in a transaction of its own.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from troth.core.access import Caller
from troth.core.errors import AppError, CallTimeout, ForbiddenError, NotFoundError, RetryableError
from troth.core.names import ActorName
from troth.core.plugin import (
    ActorPlugin,
    ExecutionOutcome,
    OutboxPlugin,
    PluginContext,
    PluginFactory,
)
from troth.core.records import OutboxEntry
from troth.core.retry import RetryPolicy


class Send(OutboxPlugin):
    kind: ClassVar[str] = "send"
    max_per_txn: ClassVar[int] = 10_000  # an event bus fans out to this many at most
    default_retry: ClassVar[RetryPolicy] = RetryPolicy(
        max_attempts=50, backoff="exponential", initial_delay_seconds=1, max_delay_seconds=60
    )

    def tell(
        self,
        target: str,
        method: str,
        *args: Any,
        on_result: str | None = None,
        tag: str | None = None,
        retry: RetryPolicy | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Send ``method(*args, **kwargs)`` to ``target`` (``TYPE/ID``); returns the id."""
        ActorName.parse(target)
        return self._enqueue(
            {"target": target, "method": method, "args": list(args), "kwargs": kwargs, "tag": tag},
            idempotency_key=None,
            retry=retry,
            on_result=on_result,
        )


class SendExecutor:
    kind = "send"
    idempotent = True  # the receiver de-duplicates on the message id

    def __init__(self, context: PluginContext, timeout: float) -> None:
        self.context = context
        self.timeout = timeout

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        spec = entry.spec
        try:
            value = await self.context.deliver(
                spec["target"],
                spec["method"],
                spec["args"],
                spec["kwargs"],
                entry.idempotency_key,
                self.timeout,
                Caller.of_actor(entry.origin),
            )
        except AppError as exc:
            return ExecutionOutcome(ok=False, error=str(exc), value=exc.to_dict())
        except (NotFoundError, ForbiddenError) as exc:
            return ExecutionOutcome(ok=False, error=str(exc))
        except (RetryableError, CallTimeout) as exc:  # redelivered with the same message id
            return ExecutionOutcome(ok=False, retryable=True, error=str(exc))
        return ExecutionOutcome(ok=True, value=value)


class SendSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_seconds: float = Field(30.0, gt=0, description="Wait for the receiver's commit.")


class SendFactory(PluginFactory):
    name: ClassVar[str] = "send"
    settings_model = SendSettings

    def __init__(self, context: PluginContext, settings: dict[str, Any]) -> None:
        super().__init__(context, settings)
        self._executor = SendExecutor(context, self.settings.timeout_seconds)

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Send(actor, pstate)

    def executors(self) -> list[Any]:
        return [self._executor]
