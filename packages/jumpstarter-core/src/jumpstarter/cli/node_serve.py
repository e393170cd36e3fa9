"""``jmp node serve``: serve a node driver of this machine to clients on other machines."""

from __future__ import annotations

import ipaddress
import signal
import socket
import stat
from pathlib import Path

import click

from ._base import EXIT_USAGE, fail, handle_errors, parse_pairs

DEFAULT_LISTEN = "127.0.0.1:7100"


@click.command()
@click.option(
    "--transport", default="grpc", show_default=True, help="Transport plugin that serves the node."
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Address to listen on; port 0 picks a free one. "
    "Anything but loopback needs TLS and a token.",
)
@click.option("--name", help="The node's name (default: this machine's host name).")
@click.option("-l", "--label", multiple=True, metavar="K=V", help="Label the node (repeatable).")
@click.option("--driver", default=None, help="Node driver that runs the tasks (default: local).")
@click.option(
    "-o",
    "--option",
    "driver_option",
    multiple=True,
    metavar="K=V",
    help="An option for the node driver, as under [nodes.NAME] options (repeatable): "
    "--driver ssh --option host=10.0.0.7 --option user=ci.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="File holding the token clients must present (one line; keep it mode 600).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="TLS certificate (chain), PEM.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS private key, PEM.")
@click.option(
    "--keepalive",
    type=click.FloatRange(min=0.5),
    default=30.0,
    metavar="SECONDS",
    show_default=True,
    help="Seconds a silent client keeps its connection and its lease on the node.",
)
@click.option(
    "--store",
    metavar="URL",
    help="Store for tasks and results (default: the config's). A postgresql:// store "
    "shared by a lab also registers this node there, for 'jmp node list' and --select.",
)
@click.option(
    "--advertise",
    metavar="URL",
    help="Endpoint clients use to reach this node, recorded in a shared store "
    "(default: the listen address, with this host's name for 0.0.0.0).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a non-loopback address without TLS or without a token (anyone who can "
    "reach the port can then run commands here).",
)
@click.option(
    "--files-root",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Confine every file put on or fetched from this node to DIR (symlinks and '..' "
    "that leave it are refused); relative paths start there. Without it, the node "
    "user's permissions are the only limit.",
)
@click.option(
    "--max-transfer",
    type=click.IntRange(min=1),
    metavar="BYTES",
    help="Largest file one transfer may carry (default: 16 GiB, or the node config's max_transfer).",
)
@click.pass_obj
@handle_errors
def serve(
    state,
    transport,
    listen,
    name,
    label,
    driver,
    driver_option,
    token_file,
    tls_cert,
    tls_key,
    keepalive,
    store,
    advertise,
    insecure,
    files_root,
    max_transfer,
) -> None:
    """Serve this machine as a node: clients elsewhere connect to it and run tasks here.

    Prints one line saying where it listens, then serves until SIGTERM or Ctrl-C
    (tasks it still runs are then stopped). Tasks, output and results go to this
    machine's store; a node killed and started again marks the tasks it was running
    'lost' and keeps every result.

    \b
    Examples:
      jmp node serve --name bench1 --label board=rpi4
      jmp node serve --listen 0.0.0.0:7100 --name lab1 --token-file /etc/jmp/token \\
          --tls-cert cert.pem --tls-key key.pem
      jmp node serve --name pi --driver ssh --option host=10.0.0.7 --option user=ci
    """
    from jumpstarter.config import NodeConfig
    from jumpstarter.plugins.interfaces import Transport

    labels = parse_pairs(label, "--label")
    driver_options = parse_pairs(driver_option, "--option")
    host = _listen_host(listen)
    token = _read_token(token_file) if token_file else None
    if (tls_cert is None) != (tls_key is None):
        fail("TLS needs both --tls-cert and --tls-key", EXIT_USAGE)
    if not _is_loopback(host):
        missing = [what for what, given in (("TLS", tls_cert), ("a token", token)) if not given]
        if missing and not insecure:
            fail(
                f"refusing to listen on {listen} without {' and '.join(missing)}: give "
                "--tls-cert/--tls-key and --token-file, or --insecure to accept the risk",
                EXIT_USAGE,
            )
        if missing:
            click.echo(
                f"jmp: warning: listening on {listen} without {' and '.join(missing)} "
                "(--insecure): anyone who can reach this port can run commands on this machine",
                err=True,
            )

    protocol = state.protocol
    if store is not None:
        protocol.config.store = store
    name = name or socket.gethostname()
    node = protocol.config.nodes.get(name)
    node = node.model_copy(deep=True) if node is not None else NodeConfig(name=name)
    node.labels.update(labels)
    if driver is not None:
        node.driver = driver
    # --- files
    if files_root is not None:
        node.files_root = Path(files_root)
    if max_transfer is not None:
        node.max_transfer = max_transfer
    if node.files_root is not None and not node.files_root.expanduser().is_dir():
        fail(f"files root {node.files_root} is not a directory", EXIT_USAGE)
    node.options.update(driver_options)
    transport_cls = protocol.plugins.transport(transport)
    if getattr(transport_cls.serve, "__func__", None) is Transport.serve.__func__:
        fail(f"transport {transport!r} cannot serve a node (it only reaches them)", EXIT_USAGE)
    protocol.plugins.node_driver(node.driver)  # an unknown driver fails before listening

    def ready(url: str) -> None:
        click.echo(f"node {node.name!r} (driver {node.driver}) listening on {url}")
        endpoint.append(advertise or _advertised(url))
        listening.set()

    endpoint: list[str] = []
    import anyio

    listening = anyio.Event()

    options = {
        "listen": listen,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "keepalive": keepalive,
        "ready": ready,
        "transport": transport,
    }
    registered = (transport, endpoint, listening)
    anyio.run(_serve, protocol, node, token, transport_cls, options, registered)


async def _serve(protocol, node, token, transport_cls, options, registered) -> None:
    import anyio

    server = protocol.make_node_server(node, token=token)
    # Tasks on this machine reach the server at the address it listens on (loopback
    # for one that listens everywhere), as soon as it is known.
    server.transport = options.pop("transport")
    ready = options["ready"]

    def ready_and_known(url: str) -> None:
        ready(url)
        for anywhere in ("0.0.0.0", "[::]"):
            url = url.replace(f"//{anywhere}:", "//127.0.0.1:", 1)
        server.url = url

    options["ready"] = ready_and_known
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            async with anyio.create_task_group() as serving:
                serving.start_soon(_stop_on_signal, serving.cancel_scope)
                if protocol.config.store_url.startswith(("postgresql://", "postgres://")):
                    serving.start_soon(_register, server, *registered)
                try:
                    await transport_cls.serve(server, options)
                finally:
                    serving.cancel_scope.cancel()
            server.close()  # stops the tasks it still runs
    except BaseExceptionGroup as group:
        # One failure (say, the port is taken) reads as itself, not as a group.
        from jumpstarter.errors import sole_error

        raise sole_error(group) from None


async def _register(server, transport: str, endpoint: list[str], listening) -> None:
    """Once listening: register in the shared store and keep the heartbeat going."""
    from jumpstarter.store.registry import HEARTBEAT_INTERVAL, NodeRegistry

    server.registry = NodeRegistry(server.store)  # leases go through it from now on
    await listening.wait()
    await server.keep_registered(endpoint=endpoint[0], transport=transport, interval=HEARTBEAT_INTERVAL)


def _advertised(url: str) -> str:
    """The listen URL, with this host's name where it listens on every address."""
    for anywhere in ("0.0.0.0", "[::]"):
        if f"//{anywhere}:" in url:
            return url.replace(anywhere, socket.getfqdn(), 1)
    return url


async def _stop_on_signal(scope) -> None:
    import anyio

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _listen_host(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}", param_hint="--listen")
    return host.strip("[]")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(path: str) -> str:
    file = Path(path).expanduser()
    try:
        token = file.read_text().strip()
        mode = file.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read --token-file {path}: {getattr(exc, 'strerror', None) or 'not text'}")
    if not token or not token.isascii() or not token.isprintable():
        fail(f"--token-file {path} must hold one line of printable ASCII")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        click.echo(
            f"jmp: warning: token file {path} is readable by others (chmod 600 {path})", err=True
        )
    return token
