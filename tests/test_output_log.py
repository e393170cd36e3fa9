"""The output log's fast paths keep its guarantees: what a live reader gets from the
writer's memory is byte for byte what the files hold, the disk space reserved ahead
never shows as output and is given back, and a task that prints without pause does
not keep the node from answering."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jumpstarter.node import output
from jumpstarter.node.output import OutputLog
from jumpstarter.plugins import Stream
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_driver_local.node import READ_SIZE

writes = st.lists(
    st.tuples(st.sampled_from(["stdout", "stderr"]), st.integers(min_value=0, max_value=3000)),
    max_size=40,
)


def _read_all(log: OutputLog, offset: int, max_bytes: int) -> list[tuple[int, str, bytes]]:
    chunks = []
    for _ in range(1000):  # a reader that makes no headway fails, not hangs
        batch = log.read(offset, max_bytes)
        if not batch:
            return chunks
        for start, stream, data in batch:
            assert start == offset and data  # complete and in order
            chunks.append((start, stream, data))
            offset += len(data)
    raise AssertionError(f"reading from {offset} never ends")


def _by_byte(chunks: list[tuple[int, str, bytes]]) -> list[tuple[str, int]]:
    return [(stream, byte) for _, stream, data in chunks for byte in data]


# The monkeypatch is the same for every example: it may be shared.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=writes, offsets=st.lists(st.integers(min_value=0, max_value=50_000), max_size=5))
def test_a_live_reader_gets_what_the_files_hold(
    writes: list[tuple[str, int]], offsets: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small memory, so readers cross from the disk into memory and back.
    monkeypatch.setattr(output, "KEEP_IN_MEMORY", 2000)
    monkeypatch.setattr(output, "JOIN_BELOW", 1000)  # pieces both joined and not

    async def main(directory: Path) -> None:
        log = OutputLog.create(directory, "t")
        expected: list[tuple[str, int]] = []
        for i, (stream, size) in enumerate(writes):
            data = bytes((i + k) % 251 for k in range(size))
            log.write(stream, data)  # type: ignore[arg-type]
            expected += [(stream, byte) for byte in data]
            for offset in offsets:
                live = _read_all(log, offset, 1500)
                assert _by_byte(live) == expected[offset:]
        from_disk = OutputLog.open(directory, "t")
        if not expected:
            assert from_disk is None  # no output, no files
            return
        assert from_disk is not None
        for offset in [0, *offsets]:
            assert _by_byte(_read_all(from_disk, offset, 1500)) == expected[offset:]
        from_disk.close()
        log.close()

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp))


@pytest.mark.anyio
async def test_a_live_reader_gets_the_bytes_as_written(tmp_path: Path) -> None:
    log = OutputLog.create(tmp_path, "t")
    large, small = b"a" * 100_000, b"b" * 100
    for data in (large, large, small, small, small, large):
        log.write("stdout", data)
    assert log.read(0, 1024 * 1024) == [(0, "stdout", large)]
    [(offset, _, data)] = log.read(100_000, 1024 * 1024)
    assert offset == 100_000 and data is large  # a large piece: no copy at all
    # Small pieces: one chunk, up to the next large piece.
    assert log.read(200_000, 1024 * 1024) == [(200_000, "stdout", small * 3)]
    assert log.read(200_150, 1024 * 1024) == [(200_150, "stdout", small[50:] + small)]
    log.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fallocate is Linux's")
@pytest.mark.anyio
async def test_space_reserved_ahead_is_never_output_and_is_given_back(tmp_path: Path) -> None:
    log = OutputLog.create(tmp_path, "t")
    piece = os.urandom(64 * 1024)
    for _ in range(48):  # 3 MiB: past the size from which space is reserved
        log.write("stdout", piece)
    size = 48 * len(piece)
    assert os.stat(log.path).st_size == size  # a reader in another process sees this
    reserved = os.stat(log.path).st_blocks * 512
    reader = OutputLog.open(tmp_path, "t")
    assert reader is not None and reader.read(size - 10, 100) == [(size - 10, "stdout", piece[-10:])]
    reader.close()
    log.close()
    after = os.stat(log.path)
    assert after.st_size == size and Path(log.path).read_bytes() == piece * 48
    if reserved > size + output.RESERVE_AHEAD // 2:  # the filesystem could reserve
        assert after.st_blocks * 512 < size + 64 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fallocate is Linux's")
@pytest.mark.anyio
async def test_space_reserved_by_a_writer_that_died_is_given_back(tmp_path: Path) -> None:
    log = OutputLog.create(tmp_path, "t")
    for _ in range(48):  # 3 MiB: past the size from which space is reserved
        log.write("stdout", bytes(64 * 1024))
    # The writing process dies: its files are closed, the log is not.
    os.close(log._fd), os.close(log._index_fd)
    size = os.stat(log.path).st_size
    if os.stat(log.path).st_blocks * 512 <= size + output.RESERVE_AHEAD // 2:
        pytest.skip("this filesystem reserves no space ahead")
    output.give_back_reserved(tmp_path, "t")
    after = os.stat(log.path)
    assert after.st_size == size and after.st_blocks * 512 < size + 64 * 1024
    output.give_back_reserved(tmp_path, "no-such-task")  # no log: nothing to do


@pytest.mark.anyio
async def test_a_task_printing_without_pause_leaves_the_node_free(
    protocol: JumpStarterProtocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk: each write holds the event loop for a few milliseconds, enough
    # for the task to fill its pipe again before the node comes back to read it.
    write = OutputLog.write
    turns = 0  # how often the rest of the node (here: a ticker) had the event loop
    writes: list[tuple[int, int]] = []  # (turns, bytes) at each write

    def slow_write(self: OutputLog, stream: Stream, data: bytes) -> None:
        writes.append((turns, len(data)))
        time.sleep(0.003)
        write(self, stream, data)

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(OutputLog, "write", slow_write)
    async with protocol.create_async_session("busy") as session, anyio.create_task_group() as tg:
        node = await session.connect("local")
        tg.start_soon(ticker)
        task = await node.start(["head", "-c", str(32 * 1024 * 1024), "/dev/zero"])
        await task.wait()
        tg.cancel_scope.cancel()
    # The rest of the node had its turn after at most READ_SIZE bytes (and the read
    # that went past them): a task whose pipe is never empty does not keep the event
    # loop to itself.
    between_turns: dict[int, int] = {}
    for turn, size in writes:
        between_turns[turn] = between_turns.get(turn, 0) + size
    assert sum(between_turns.values()) == 32 * 1024 * 1024
    assert max(between_turns.values()) <= 2 * READ_SIZE
