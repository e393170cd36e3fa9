"""Files put on and fetched from nodes: the local node and its transport, the files
root, the size limit, checksums, ENOSPC on a real small filesystem, and `jmp cp` /
`jmp run --put/--get/--junit` / `jmp task artifacts|get` through click's runner and
real `jmp` processes. (Over gRPC: tests/test_files_grpc.py.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import invoke_jmp, run_jmp
from jumpstarter import hookimpl
from jumpstarter.config import Config, NodeConfig
from jumpstarter.errors import BadRequest, LocalFileError, NotFound, TooLarge, Unavailable
from jumpstarter.plugins.manager import get_plugin_manager
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_driver_local.node import LocalNodeDriver
from jumpstarter_protocol import (
    Error,
    FileChunk,
    FileEnd,
    MakeDir,
    OpenUpload,
    PutFile,
    decode,
    encode,
)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Temporary files of uploads or downloads left in ``directory``."""
    return sorted(p.name for p in directory.rglob("*.jmp-part"))


def boxed(data_dir: Path, root: Path, **node: object) -> JumpStarterProtocol:
    """A client whose local node ``boxed`` has the files root ``root``."""
    nodes = {"boxed": NodeConfig(files_root=root, **node)}
    return JumpStarterProtocol(Config(data_dir=data_dir, nodes=nodes))


# --- the protocol ----------------------------------------------------------------------


def test_file_chunks_travel_raw_beside_the_header() -> None:
    data = bytes(range(256)) * 16
    frame = encode(FileChunk(offset=7, data=data))
    assert frame.endswith(data) and b'"data"' not in frame
    assert decode(frame) == FileChunk(offset=7, data=data)


# --- the local node through the Python API ----------------------------------------------


def test_put_and_get_round_trip_with_modes_globs_and_artifacts(protocol, tmp_path: Path) -> None:
    source = tmp_path / "fw.bin"
    source.write_bytes(os.urandom(9_000_000))  # more than two chunks
    source.chmod(0o750)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    with protocol.create_session("files") as session:
        node = session.connect("local")
        assert "files" in node.info.capabilities
        (put,) = node.put(source, f"{node_dir}/")
        assert (put.target, put.size, put.sha256) == (str(node_dir / "fw.bin"), 9_000_000, sha(source))
        assert (node_dir / "fw.bin").stat().st_mode & 0o777 == 0o750
        (got,) = node.get(str(node_dir / "fw.bin"), tmp_path / "back.bin")
        assert sha(tmp_path / "back.bin") == sha(source) == got.sha256

        tree = tmp_path / "build"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "run.sh").write_text("echo hi\n")
        (tree / "sub" / "run.sh").chmod(0o755)
        (tree / "sub").chmod(0o710)
        with pytest.raises(LocalFileError, match=f"^{tree}: is a directory \\(copy it with -r\\)$"):
            node.put(tree, str(node_dir))
        copied = node.put(tree, str(node_dir), recursive=True)
        assert [c.target for c in copied] == [str(node_dir / "build" / "sub" / "run.sh")]
        assert (node_dir / "build" / "sub").stat().st_mode & 0o777 == 0o710
        assert (node_dir / "build" / "sub" / "run.sh").stat().st_mode & 0o777 == 0o755
        fetched = node.get(str(node_dir / "build"), tmp_path / "again", recursive=True)
        assert (tmp_path / "again" / "sub" / "run.sh").read_text() == "echo hi\n"
        assert len(fetched) == 1

        assert [f.path for f in node.glob(f"{node_dir}/*/s?b/*.sh")] == [str(node_dir / "build/sub/run.sh")]
        task = node.start(["true"], cwd=str(node_dir))
        task.wait()
        assert [f.path for f in node.glob("*.bin", task_id=task.id)] == [str(node_dir / "fw.bin")]
        recorded = task.add_artifacts([got])
        assert [(a.path, a.size, a.sha256) for a in recorded] == [(str(node_dir / "fw.bin"), 9_000_000, sha(source))]
        assert task.artifacts() == recorded
    assert leftovers(tmp_path) == []


def test_bad_input_is_one_clear_error_and_leaves_nothing(protocol, tmp_path: Path) -> None:
    node_dir = tmp_path / "node"
    (node_dir / "adir").mkdir(parents=True)
    with protocol.create_session("files") as session:
        node = session.connect("local")
        with pytest.raises(LocalFileError, match="^nope.bin: no such file or directory$"):
            node.put("nope.bin", str(node_dir))
        with pytest.raises(NotFound, match=f"^{node_dir}/gone: no such file on node 'local'$"):
            node.get(f"{node_dir}/gone", tmp_path)
        with pytest.raises(LocalFileError, match=f"is a directory on node 'local' \\(copy it with -r\\)$"):
            node.get(str(node_dir / "adir"), tmp_path)
        upload = dict(size=3, upload_id="u" * 12)
        with pytest.raises(BadRequest, match=f"^{node_dir}/adir: is a directory on node 'local'$"):
            node.request(OpenUpload(path=str(node_dir / "adir"), **upload))
        with pytest.raises(NotFound, match=f"^{node_dir}/no/x: no directory {node_dir}/no on node 'local'$"):
            node.request(OpenUpload(path=str(node_dir / "no" / "x"), **upload))

        async def put_with(sha256: str, data: bytes) -> object:
            async def chunks():
                yield FileChunk(offset=0, data=data)
                yield FileEnd(size=len(data), sha256=sha256)

            header = PutFile(path=str(node_dir / "f"), **upload)
            return await node.aio.transport.put_file(header, chunks())

        call = session._call
        reply = call(put_with, "0" * 64, b"abc")
        assert isinstance(reply, Error) and reply.message == (
            f"{node_dir}/f: checksum mismatch: sha256 {hashlib.sha256(b'abc').hexdigest()} arrived, "
            f"{'0' * 64} was sent; nothing was written"
        )
        reply = call(put_with, hashlib.sha256(b"abcd").hexdigest(), b"abcd")
        assert isinstance(reply, Error) and reply.message == f"{node_dir}/f: more than the 3 bytes announced"
        assert sorted(os.listdir(node_dir)) == ["adir"]  # nothing under the name, no temporary file
        reply = call(put_with, hashlib.sha256(b"abc").hexdigest(), b"abc")
        assert reply.type == "file_written" and (node_dir / "f").read_bytes() == b"abc"


def test_an_upload_nobody_resumed_goes_with_the_next_one(protocol, tmp_path: Path) -> None:
    import time

    node_dir = tmp_path / "node"
    node_dir.mkdir()
    stale, fresh = node_dir / ".fw.bin.oldupload1.jmp-part", node_dir / ".fw.bin.resuming1.jmp-part"
    stale.write_bytes(b"left by a client that never came back")
    fresh.write_bytes(b"a client reconnecting right now")
    os.utime(stale, (time.time() - 7200,) * 2)
    (tmp_path / "fw.bin").write_bytes(b"fw")
    with protocol.create_session("s") as session:
        session.connect("local").put(tmp_path / "fw.bin", f"{node_dir}/")
    assert sorted(os.listdir(node_dir)) == [fresh.name, "fw.bin"]


def test_a_transfer_over_the_limit_is_refused(data_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2000)
    nodes = {"small": NodeConfig(max_transfer=1000)}
    with JumpStarterProtocol(Config(data_dir=data_dir, nodes=nodes)).create_session("s") as session:
        node = session.connect("small")
        assert node.info.limits["max_transfer"] == 1000
        limit = "2000 bytes is over the limit of 1000 bytes per transfer of node 'small'"
        with pytest.raises(TooLarge, match=f"^{tmp_path}/copy: {limit}$"):
            node.put(big, str(tmp_path / "copy"))
        with pytest.raises(TooLarge, match=f"^{big}: {limit}$"):
            node.get(str(big), tmp_path / "copy")
    assert sorted(os.listdir(tmp_path)) == ["big", "data"]


# --- the files root ----------------------------------------------------------------------


def test_the_files_root_refuses_every_way_out(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.write_text("secret\n")
    (root / "out").symlink_to(tmp_path)  # a symlink pointing out
    (root / "ok").symlink_to(root / "in")  # one that stays inside
    source = tmp_path / "fw.bin"
    source.write_bytes(b"firmware")
    with boxed(data_dir, root).create_session("s") as session:
        node = session.connect("boxed")
        escapes = ["../secret", str(outside), "out/secret", "in/../../secret", "/etc/passwd"]
        for path in escapes:
            message = f"^{path}: outside the files root {root} of node 'boxed'$"
            with pytest.raises(BadRequest, match=message):
                node.get(path, tmp_path / "stolen")
            with pytest.raises(BadRequest, match=message):
                node.put(source, path)
        with pytest.raises(BadRequest, match="^out/x: outside the files root"):
            node.request(MakeDir(path="out/x"))
        assert not (tmp_path / "stolen").exists() and outside.read_text() == "secret\n"
        assert node.glob("*") == node.glob("*")  # a glob offers nothing outside
        assert [f.path for f in node.glob("*")] == [str(root / "in"), str(root / "ok")]
        # Relative paths start at the root; inside it, everything works.
        (put,) = node.put(source, "ok/fw.bin")
        assert put.target == str(root / "in" / "fw.bin")
        node.get("in/fw.bin", tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == b"firmware"


def test_jmp_cp_outside_the_root_is_one_line(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "jumpstarter.toml").write_text(f'[nodes.boxed]\nfiles_root = "{root}"\n')
    (tmp_path / "fw.bin").write_bytes(b"fw")
    for how in ("runner", "process"):
        code, out, err = invoke_jmp(how, ["cp", "fw.bin", "boxed:../fw.bin"])
        assert (code, out, err) == (2, "", f"jmp: error: ../fw.bin: outside the files root {root} of node 'boxed'\n")
    assert sorted(os.listdir(tmp_path)) == ["data", "fw.bin", "jumpstarter.toml", "root"]


# --- ENOSPC on a real small filesystem ------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test (needs root), unmounted after."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_no_space_left_fails_with_that_reason_and_leaves_nothing(protocol, small_fs: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    small = tmp_path / "small.bin"
    small.write_bytes(b"fits")
    with protocol.create_session("s") as session:
        node = session.connect("local")
        with pytest.raises(Unavailable, match=f"^{small_fs}/big.bin: no space left on device on node 'local'$"):
            node.put(big, f"{small_fs}/")
        assert os.listdir(small_fs) == []
        node.put(small, f"{small_fs}/")  # the node keeps serving, and the space came back
        assert os.listdir(small_fs) == ["small.bin"]
    code, out, err = invoke_jmp("process", ["cp", str(big), f"local:{small_fs}/big.bin"])
    assert (code, err) == (5, f"jmp: error: {small_fs}/big.bin: no space left on device on node 'local'\n")
    assert os.listdir(small_fs) == ["small.bin"]
    # No room here for a fetched file: the same, one line, nothing left.
    code, out, err = invoke_jmp("process", ["cp", f"local:{big}", f"{small_fs}/back.bin"])
    assert (code, err) == (1, f"jmp: error: {small_fs}/back.bin: no space left on device\n")
    assert os.listdir(small_fs) == ["small.bin"]


# --- a node without the capability -----------------------------------------------------------


class NoFiles(LocalNodeDriver):
    capabilities = ["exec"]

    def __init__(self, node: NodeConfig) -> None:
        super().__init__(node)
        self.files = None


class NoFilesPlugin:
    @hookimpl
    def jmp_register_node_drivers(self, register):
        register("nofiles", NoFiles)


def test_a_node_without_files_says_so(data_dir: Path, tmp_path: Path) -> None:
    config = Config(data_dir=data_dir, nodes={"bare": NodeConfig(driver="nofiles")})
    protocol = JumpStarterProtocol(config, plugins=get_plugin_manager(env={}, extra=[NoFilesPlugin()]))
    (tmp_path / "f").write_text("x")
    with protocol.create_session("s") as session:
        node = session.connect("bare")
        assert "files" not in node.info.capabilities and "max_transfer" not in node.info.limits
        message = "^node 'bare' has no 'files' capability: it cannot put or fetch files$"
        with pytest.raises(BadRequest, match=message):
            node.put(tmp_path / "f", "f")
        with pytest.raises(BadRequest, match=message):
            node.get("f", tmp_path / "g")
    assert not (tmp_path / "g").exists()


# --- the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["runner", "process"])
def test_jmp_cp_both_ways_and_its_usage_errors(data_dir: Path, tmp_path: Path, how: str) -> None:
    (tmp_path / "fw.bin").write_bytes(os.urandom(100_000))
    (tmp_path / "dest").mkdir()
    assert invoke_jmp(how, ["cp", "fw.bin", f"local:{tmp_path}/dest/"]) == (0, "", "")
    assert sha(tmp_path / "dest" / "fw.bin") == sha(tmp_path / "fw.bin")
    code, out, err = invoke_jmp(how, ["cp", "-v", f"local:{tmp_path}/dest/fw.bin", "back.bin"])
    assert code == 0 and out == f"{tmp_path}/dest/fw.bin -> back.bin 100000 bytes sha256 {sha(tmp_path / 'fw.bin')}\n"
    assert invoke_jmp(how, ["cp", "a", "b"]) == (
        2, "", "jmp: error: cannot copy between two local paths: give one side as NODE:PATH and the other "
        "local (try 'jmp cp --help')\n")
    assert invoke_jmp(how, ["cp", "nope.bin", f"local:{tmp_path}/"]) == (
        1, "", "jmp: error: nope.bin: no such file or directory\n")
    assert invoke_jmp(how, ["cp", f"local:{tmp_path}/dest", "x"]) == (
        1, "", f"jmp: error: {tmp_path}/dest: is a directory on node 'local' (copy it with -r)\n")
    assert invoke_jmp(how, ["cp", "fw.bin", "elsewhere:/tmp/"])[2].startswith("jmp: error: unknown node 'elsewhere'")


JUNIT = """<testsuite name="suite"><testcase name="boots"/>
<testcase name="flashes"><failure message="bad block"/></testcase></testsuite>"""


def test_jmp_run_puts_gets_and_imports_junit_also_when_the_task_fails(data_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "fw.bin").write_bytes(os.urandom(50_000))
    script = (
        "cmp fw.bin image.bin && mkdir -p logs && echo one > logs/a.txt && echo two > logs/b.txt"
        f" && printf '%s' '{JUNIT}' > junit.xml; exit 3"
    )
    done = run_jmp("run", "--cwd", str(work), "--put", "fw.bin", "--put", "fw.bin:image.bin",
                   "--get", "logs/*.txt", "--get", "missing*", "--junit", "junit.xml", "--shell", "--", script)
    assert done.returncode == 3, done.stderr
    task_id = next(p.name for p in (tmp_path / "artifacts").iterdir())
    assert done.stderr.splitlines() == [
        "jmp: warning: 'missing*' matched no file on node 'local'",
        f"jmp: 3 artifact(s) of task {task_id} in artifacts/{task_id}",
        "jmp: 2 result(s) imported from junit.xml",
    ]
    got = tmp_path / "artifacts" / task_id
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()) == [
        "junit.xml", "logs/a.txt", "logs/b.txt"]
    done = run_jmp("task", "artifacts", task_id)
    assert [line.split()[:3] for line in done.stdout.splitlines()] == [
        ["PATH", "SIZE", "SHA256"],
        [f"{work}/logs/a.txt", "4", sha(got / "logs/a.txt")],
        [f"{work}/logs/b.txt", "4", sha(got / "logs/b.txt")],
        [f"{work}/junit.xml", str(len(JUNIT)), sha(got / "junit.xml")],
    ]
    done = run_jmp("result", "query", "--task", task_id, "--format", "csv")
    assert ",local,boots,passed," in done.stdout and ",local,flashes,failed,,bad block," in done.stdout
    (tmp_path / "again").mkdir()
    assert invoke_jmp("runner", ["task", "get", task_id, "a.txt", "--to", "again"]) == (0, "again/a.txt\n", "")
    (work / "logs" / "b.txt").write_text("changed\n")
    code, out, err = invoke_jmp("runner", ["task", "get", task_id, "b.txt", "--to", "again"])
    assert code == 1 and err.startswith(f"jmp: error: {work}/logs/b.txt: changed on node 'local' since it was recorded")
    assert os.listdir(tmp_path / "again") == ["a.txt"]
    # A missing local file fails before anything runs: no task at all.
    before = run_jmp("task", "list", "--format", "json").stdout
    code, out, err = invoke_jmp("runner", ["run", "--put", "nope.bin", "--", "true"])
    assert (code, err) == (2, "jmp: error: Invalid value for --put: nope.bin: no such file or directory "
                              "(try 'jmp run --help')\n")
    assert run_jmp("task", "list", "--format", "json").stdout == before


def test_uploads_from_many_tasks_at_once(protocol, tmp_path: Path) -> None:
    """Uploads of one node run side by side, each whole."""
    sources = []
    for i in range(4):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(3_000_000 + i))
        sources.append(path)

    async def main() -> None:
        async with protocol.create_async_session("many") as session:
            node = await session.connect("local")
            async with anyio.create_task_group() as tg:
                for path in sources:
                    tg.start_soon(node.put, path, f"{path}.copy")

    anyio.run(main)
    for path in sources:
        assert sha(Path(f"{path}.copy")) == sha(path)
    assert leftovers(tmp_path) == []


# --- the thread helpers drivers may use --------------------------------------------------


def test_thread_worker_keeps_order_and_hands_back_errors(tmp_path: Path) -> None:
    from jumpstarter.plugins import ThreadWorker, read_ahead

    async def main() -> None:
        seen: list[int] = []
        worker = ThreadWorker(seen.append, ahead=1)
        for i in range(100):
            await worker.put(i)
        await worker.finish()
        assert seen == list(range(100))

        def fail(item: int) -> None:
            raise OSError(28, "No space left on device")

        failing = ThreadWorker(fail)
        await failing.put(1)
        with pytest.raises(OSError, match="No space left on device"):
            for i in range(10):
                await failing.put(i)
            await failing.finish()
        await failing.aclose()

        path = tmp_path / "data"
        path.write_bytes(os.urandom(1_000_001))
        fd = os.open(path, os.O_RDONLY)
        try:
            got = [chunk async for chunk in read_ahead(fd, chunk=65536)]
        finally:
            os.close(fd)
        assert b"".join(got) == path.read_bytes() and {len(c) for c in got[:-1]} == {65536}
        fd = os.open(tmp_path, os.O_RDONLY)  # a directory: the read fails, and says why
        try:
            with pytest.raises(IsADirectoryError):
                async for _ in read_ahead(fd, chunk=10):
                    pass
        finally:
            os.close(fd)

    anyio.run(main)
