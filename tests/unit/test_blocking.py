"""The blocking-query state machine and the watch() drivers, without a network."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

import pytest

from consul_connect.agent.blocking import (
    MAX_INDEX,
    Backoff,
    BlockingState,
    HashBlockingState,
    RateLimiter,
    format_wait,
    parse_index,
)
from consul_connect.agent.client import QueryMeta
from consul_connect.agent.watch import watch, watch_hash
from consul_connect.errors import (
    AgentPermissionError,
    AgentRequestError,
    AgentResponseError,
    AgentUnavailableError,
)

# -- pure helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(300.0, "300000ms"), (1.5, "1500ms"), (0.0004, "1ms"), (0.0, None), (-1.0, None)],
)
def test_wait_is_formatted_in_milliseconds_like_go(seconds: float, expected: str | None) -> None:
    assert format_wait(seconds) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("42", 42),
        (" 7 ", 7),
        ("0", 0),
        (str(MAX_INDEX), MAX_INDEX),
        (str(MAX_INDEX + 1), None),
        ("-3", None),
        ("+3", None),
        ("12abc", None),
        ("", None),
        (None, None),
    ],
)
def test_index_header_parses_as_uint64_only(header: str | None, expected: int | None) -> None:
    assert parse_index(header) == expected


# -- index rules --------------------------------------------------------------


def test_first_request_is_non_blocking() -> None:
    state = BlockingState()
    assert state.next_request_params(300.0) == {"wait": "300000ms"}


def test_next_request_blocks_on_returned_index() -> None:
    state = BlockingState()
    outcome = state.on_response("17", "payload")
    assert outcome.changed and outcome.index == 17 and not outcome.reset
    assert state.next_request_params(10.0) == {"index": "17", "wait": "10000ms"}


def test_no_wait_param_when_wait_is_zero() -> None:
    state = BlockingState()
    state.on_response("5", "p")
    assert state.next_request_params(0) == {"index": "5"}


def test_index_zero_from_server_is_treated_as_one() -> None:
    state = BlockingState()
    outcome = state.on_response("0", "p")
    assert outcome.index == 1
    assert state.next_request_params(1.0)["index"] == "1"


@pytest.mark.parametrize("header", [None, "", "abc", "-1", "1.5"])
def test_missing_or_garbled_index_is_an_error_and_keeps_state(header: str | None) -> None:
    state = BlockingState()
    state.on_response("9", "p")
    outcome = state.on_response(header, "other")
    assert outcome.error is not None
    assert not outcome.changed
    assert state.index == 9


def test_index_going_backwards_resets_to_zero() -> None:
    state = BlockingState()
    state.on_response("100", "a")
    outcome = state.on_response("40", "b")
    assert outcome.reset
    assert outcome.index == 0
    assert outcome.changed  # the new payload is still delivered
    assert "index" not in state.next_request_params(1.0)
    # The restarted non-blocking read adopts the new, lower index.
    again = state.on_response("40", "b")
    assert not again.reset and again.index == 40 and not again.changed


def test_same_index_is_not_a_reset() -> None:
    state = BlockingState()
    state.on_response("8", "a")
    outcome = state.on_response("8", "a")
    assert not outcome.reset and not outcome.changed and outcome.index == 8


def test_unchanged_payload_is_not_delivered_even_when_index_moves() -> None:
    state = BlockingState()
    assert state.on_response("1", {"Roots": ["r1"]}).changed
    assert not state.on_response("2", {"Roots": ["r1"]}).changed
    assert state.on_response("3", {"Roots": ["r1", "r2"]}).changed
    assert not state.on_response("4", {"Roots": ["r1", "r2"]}).changed
    assert state.index == 4


def test_first_payload_is_delivered_even_if_it_equals_none() -> None:
    state = BlockingState()
    assert state.on_response("1", None).changed
    assert not state.on_response("2", None).changed


def test_error_makes_the_next_request_non_blocking() -> None:
    state = BlockingState()
    state.on_response("50", "a")
    state.on_error(0.5)
    assert "index" not in state.next_request_params(5.0)


# -- backoff ------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap_with_rand_near_one() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    delays = [backoff.failure(0.999999) for _ in range(10)]
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.99 <= delay <= ceiling


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, 0.999])
def test_backoff_is_full_jitter_over_zero_to_ceiling(rand: float) -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    for _ in range(5):
        backoff.failure(0.0)
    # sixth failure: ceiling 0.5 * 2**5 = 16
    assert backoff.failure(rand) == pytest.approx(rand * 16.0)


def test_backoff_never_exceeds_cap_after_a_long_outage() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    assert max(backoff.failure(0.999) for _ in range(5000)) <= 30.0


def test_success_resets_the_backoff() -> None:
    state = BlockingState()
    for _ in range(6):
        state.on_error(0.999)
    state.on_response("3", "x")
    assert state.on_error(0.999) <= 0.5


def test_garbled_index_does_not_reset_the_backoff() -> None:
    state = BlockingState()
    for _ in range(3):
        state.on_error(0.0)
    state.on_response(None, "x")
    assert state.on_error(0.999) == pytest.approx(0.999 * 4.0)


def test_invalid_backoff_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0, cap=1)
    with pytest.raises(ValueError):
        Backoff(base=2, cap=1)


# -- rate limit ---------------------------------------------------------------


def test_rate_limiter_lets_a_burst_through_then_spaces_requests() -> None:
    limiter = RateLimiter(burst=3, interval=1.0)
    assert [limiter.acquire(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire(0.0) == pytest.approx(1.0)
    assert limiter.acquire(0.0) == pytest.approx(2.0)


def test_rate_limiter_refills_over_time() -> None:
    limiter = RateLimiter(burst=2, interval=1.0)
    limiter.acquire(0.0)
    limiter.acquire(0.0)
    assert limiter.acquire(10.0) == 0.0
    assert limiter.acquire(10.0) == 0.0
    assert limiter.acquire(10.0) > 0.0


# -- hash variant -------------------------------------------------------------


def test_hash_state_blocks_on_returned_hash_and_dedups() -> None:
    state = HashBlockingState()
    assert state.next_request_params(5.0) == {"wait": "5000ms"}
    assert state.on_response("abc", {"ID": "web-1"}).changed
    assert state.next_request_params(5.0) == {"hash": "abc", "wait": "5000ms"}
    assert not state.on_response("def", {"ID": "web-1"}).changed
    assert state.hash == "def"


def test_hash_state_missing_hash_is_an_error() -> None:
    state = HashBlockingState()
    state.on_response("abc", 1)
    assert state.on_response(None, 2).error is not None
    assert state.on_response("  ", 2).error is not None
    assert state.hash == "abc"


def test_hash_state_error_drops_the_hash() -> None:
    state = HashBlockingState()
    state.on_response("abc", 1)
    state.on_error(0.1)
    assert "hash" not in state.next_request_params(1.0)


# -- watch() ------------------------------------------------------------------


class FakeClock:
    """Sleep that only advances a virtual clock, recording every delay."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


Step = tuple[Any, QueryMeta] | BaseException


def scripted(steps: list[Step]) -> tuple[Callable[..., Any], list[tuple[Any, float]]]:
    """A fetch that plays ``steps`` in order, recording its (index/hash, wait) arguments."""
    calls: list[tuple[Any, float]] = []
    remaining = list(steps)

    async def fetch(key: Any, wait: float) -> tuple[Any, QueryMeta]:
        calls.append((key, wait))
        if not remaining:
            await asyncio.Event().wait()  # block like an idle blocking query
        step = remaining.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    return fetch, calls


async def take(it: AsyncGenerator[Any, None], n: int) -> list[Any]:
    out: list[Any] = []
    async with contextlib.aclosing(it):
        async for value in it:
            out.append(value)
            if len(out) == n:
                break
    return out


async def test_watch_yields_only_changed_values_and_blocks_on_index() -> None:
    clock = FakeClock()
    fetch, calls = scripted(
        [
            ("a", QueryMeta(index=5)),
            ("a", QueryMeta(index=6)),  # spurious wake-up: same payload
            ("b", QueryMeta(index=9)),
        ]
    )
    values = await take(watch(fetch, wait=60.0, sleep=clock.sleep, clock=clock.time), 2)
    assert values == ["a", "b"]
    assert calls == [(0, 60.0), (5, 60.0), (6, 60.0)]


async def test_watch_retries_unavailable_agent_with_jittered_backoff() -> None:
    clock = FakeClock()
    errors: list[BaseException] = []
    fetch, calls = scripted(
        [
            ("a", QueryMeta(index=5)),
            AgentUnavailableError("down"),
            AgentUnavailableError("still down"),
            ("b", QueryMeta(index=7)),
        ]
    )
    values = await take(
        watch(
            fetch,
            sleep=clock.sleep,
            clock=clock.time,
            rand=lambda: 0.5,
            on_error=errors.append,
            limiter=RateLimiter(burst=100),
        ),
        2,
    )
    assert values == ["a", "b"]
    assert [str(e) for e in errors] == ["down", "still down"]
    assert clock.sleeps == [pytest.approx(0.25), pytest.approx(0.5)]
    # After a failure the retry is a non-blocking read.
    assert [key for key, _ in calls] == [0, 5, 0, 0]


async def test_watch_raises_permission_error_instead_of_retrying() -> None:
    clock = FakeClock()
    fetch, calls = scripted(
        [
            ("a", QueryMeta(index=5)),
            AgentPermissionError("lacks service:write", status=403, body="Permission denied"),
        ]
    )
    it = watch(fetch, sleep=clock.sleep, clock=clock.time)
    assert await anext(it) == "a"
    with pytest.raises(AgentPermissionError):
        await anext(it)
    assert len(calls) == 2


async def test_watch_stops_on_a_request_the_agent_can_never_accept() -> None:
    clock = FakeClock()
    errors: list[BaseException] = []
    bad = AgentRequestError("the agent rejected the filter", status=500)
    fetch, calls = scripted([("a", QueryMeta(index=5)), bad, ("b", QueryMeta(index=6))])
    it = watch(fetch, sleep=clock.sleep, clock=clock.time, on_error=errors.append)
    assert await anext(it) == "a"
    with pytest.raises(AgentRequestError):
        await anext(it)
    assert len(calls) == 2 and errors == [] and clock.sleeps == []
    hashed, _ = scripted([bad])
    with pytest.raises(AgentRequestError):
        await take(watch_hash(hashed, sleep=clock.sleep, clock=clock.time), 1)


async def test_watch_treats_missing_index_as_error() -> None:
    clock = FakeClock()
    errors: list[BaseException] = []
    fetch, _ = scripted([("a", QueryMeta(index=0)), ("b", QueryMeta(index=3))])
    values = await take(
        watch(fetch, sleep=clock.sleep, clock=clock.time, on_error=errors.append, rand=lambda: 0),
        1,
    )
    assert values == ["b"]
    assert len(errors) == 1 and isinstance(errors[0], AgentResponseError)


async def test_watch_restarts_at_zero_when_index_goes_backwards() -> None:
    clock = FakeClock()
    fetch, calls = scripted(
        [
            ("a", QueryMeta(index=100)),
            ("a", QueryMeta(index=10)),
            ("c", QueryMeta(index=11)),
        ]
    )
    values = await take(
        watch(fetch, sleep=clock.sleep, clock=clock.time, limiter=RateLimiter(burst=100)), 2
    )
    assert values == ["a", "c"]
    assert [key for key, _ in calls] == [0, 100, 0]


async def test_watch_rate_limits_a_server_that_answers_at_once() -> None:
    clock = FakeClock()
    fetch, _ = scripted([(i, QueryMeta(index=i + 1)) for i in range(6)])
    values = await take(
        watch(
            fetch,
            sleep=clock.sleep,
            clock=clock.time,
            limiter=RateLimiter(burst=2, interval=1.0),
        ),
        6,
    )
    assert values == list(range(6))
    assert clock.now == pytest.approx(4.0)


async def test_broken_error_hook_does_not_stop_the_watch() -> None:
    clock = FakeClock()
    fetch, _ = scripted([AgentUnavailableError("down"), ("a", QueryMeta(index=2))])

    def hook(exc: BaseException) -> None:
        raise RuntimeError("observer bug")

    values = await take(watch(fetch, sleep=clock.sleep, clock=clock.time, on_error=hook), 1)
    assert values == ["a"]


async def test_unexpected_exception_from_fetch_propagates() -> None:
    clock = FakeClock()
    fetch, _ = scripted([KeyError("bug")])
    with pytest.raises(KeyError):
        await take(watch(fetch, sleep=clock.sleep, clock=clock.time), 1)


async def test_cancelling_a_watch_mid_request_ends_it_cleanly() -> None:
    clock = FakeClock()
    fetch, calls = scripted([("a", QueryMeta(index=1))])  # then blocks forever
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in watch(fetch, sleep=clock.sleep, clock=clock.time):
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), timeout=5)
    while len(calls) < 2:  # the second (blocking) request is in flight
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert task.cancelled()


async def test_watch_hash_blocks_on_content_hash_and_dedups() -> None:
    clock = FakeClock()
    fetch, calls = scripted(
        [
            ({"ID": "web-1"}, QueryMeta(content_hash="h1")),
            ({"ID": "web-1"}, QueryMeta(content_hash="h2")),
            ({"ID": "web-1", "Port": 2}, QueryMeta(content_hash="h3")),
        ]
    )
    values = await take(watch_hash(fetch, wait=30.0, sleep=clock.sleep, clock=clock.time), 2)
    assert values == [{"ID": "web-1"}, {"ID": "web-1", "Port": 2}]
    assert calls == [(None, 30.0), ("h1", 30.0), ("h2", 30.0)]


async def test_watch_hash_raises_permission_error() -> None:
    clock = FakeClock()
    fetch, _ = scripted([AgentPermissionError("denied", status=403)])
    with pytest.raises(AgentPermissionError):
        await take(watch_hash(fetch, sleep=clock.sleep, clock=clock.time), 1)
