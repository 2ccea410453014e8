"""Reading a client's request stream with an idle timeout: a stream that stalls is ended
instead of holding its buffers and its slot forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

from services.common.errors import DeadlineExceeded

T = TypeVar("T")


async def with_idle_timeout(requests: AsyncIterable[T], seconds: float, what: str) -> AsyncIterator[T]:
    """The items of `requests`; DeadlineExceeded when none arrives for `seconds`."""
    iterator = aiter(requests)
    while True:
        try:
            item = await asyncio.wait_for(anext(iterator), seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"{what}: nothing arrived for {seconds:g} s; the stream was ended"
            ) from None
        yield item
