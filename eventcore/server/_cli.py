"""The ``eventcore`` command line."""

from __future__ import annotations

import anyio
import typer
from rich.console import Console

from eventcore.errors import ConfigError, EventcoreError

from ._schedules_cli import schedules_app as _schedules_app
from ._sessions_cli import sessions_app
from ._worker_cli import worker as _worker_command

app = typer.Typer(help="eventcore: event-sourced streaming sessions on Redis Streams.",
                  no_args_is_help=True)
console = Console()
app.command("worker")(_worker_command)
app.add_typer(_schedules_app, name="schedules")
app.add_typer(sessions_app, name="sessions")


def _print_version(value: bool) -> None:
    if value:
        from eventcore import __version__

        typer.echo(f"eventcore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """eventcore: event-sourced streaming sessions on Redis Streams."""


def _fatal(command: str, exc: Exception) -> typer.Exit:
    """Bad configuration is the user's to fix: one line naming it, exit code 2 (a usage
    error, as click's own), no traceback."""
    typer.echo(f"eventcore {command}: error: {exc}", err=True)
    return typer.Exit(2)


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="Interface the API listens on."),
    port: int = typer.Option(8000, help="API port (a free one is picked if it is taken)."),
    exit_after: float | None = typer.Option(None, "--exit-after", min=0,
                                            help="Stop by itself after this many seconds."),
) -> None:
    """Run the whole system on the embedded Redis with the sample echo agent."""
    from eventcore._settings import load_settings

    from ._demo import run_demo
    from ._dev import embedded_redis, terminate_on_sigterm

    terminate_on_sigterm()  # until the demo's own handlers are in place: still a clean stop
    from ._preflight import require_redis

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise _fatal("demo", exc) from None
    require_redis("demo", settings)
    try:
        # the embedded redis-server is started (and stopped, however the demo ends) here
        with embedded_redis(settings) as running:
            anyio.run(lambda: run_demo(host=host, port=port, exit_after=exit_after,
                                       console=console, settings=running,
                                       embedded=settings.redis_url is None))
    except KeyboardInterrupt:
        console.print("demo stopped")
    except EventcoreError as exc:
        typer.echo(f"eventcore demo: error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def dev(
    agents: str = typer.Argument(..., metavar="APP", help="module:attribute of your "
                                 "workers.App (the current directory is importable)."),
    host: str = typer.Option("127.0.0.1", help="Interface the API listens on."),
    port: int = typer.Option(8000, help="API port (a free one is picked if it is taken)."),
    reload: bool = typer.Option(True, help="Restart the app process when a *.py file under "
                                "the current directory changes."),
) -> None:
    """Run your app on the embedded Redis: API, /ui, /docs and a worker, reloaded on change."""
    from ._dev import dev_command

    dev_command(agents, host=host, port=port, reload=reload, out=console)


@app.command()
def serve(
    agents: str | None = typer.Argument(None, metavar="[APP]",
                                        help="module:attribute of a workers.App; restricts "
                                        "POST /v1/sessions to its agents."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    subscribers: bool = typer.Option(True, help="Run the projector, persistence and retention "
                                     "in this process."),
    log_level: str = typer.Option("info", help="debug, info, warning, error."),
    log_format: str = typer.Option("json", help="json or text."),
) -> None:
    """Serve the HTTP API, SSE hub, WebRTC and /ui (plus the built-in subscribers)."""
    from . import serve as run_server
    from . import service_app

    app_obj = None
    if agents:
        from ._worker_cli import load_app

        app_obj = load_app(agents)
    from eventcore._settings import load_settings

    from ._preflight import require_redis

    try:
        settings = load_settings()
        service = service_app(app_obj, settings, subscribers=subscribers)
    except ConfigError as exc:
        raise _fatal("serve", exc) from None
    require_redis("serve", settings)
    auth = service.state.auth
    if auth.generated_key:  # shown once, so the developer can use it; never logged
        typer.echo("eventcore serve: EVENTCORE_API_KEY is not set; API key of this process: "
                   f"{auth.api_key}", err=True)
    run_server(service, host=host, port=port,
               log_level=log_level, log_format="text" if log_format == "text" else "json")


@app.command()
def tail(
    session: str = typer.Argument(..., help="The session id to follow."),
    after: str = typer.Option("0", "--after", help="Start after this seq (0: from the "
                              "beginning); <seq>.<epoch> as a stopped tail prints it once the "
                              "stream's history diverged (a failover)."),
    url: str | None = typer.Option(None, "--url", envvar="EVENTCORE_URL", help="Follow through "
                                   "this server's SSE endpoint instead of reading Redis."),
    token: str | None = typer.Option(None, "--token", envvar=["EVENTCORE_TOKEN",
                                     "EVENTCORE_API_KEY"], show_default=False,
                                     help="Session token or API key for --url."),
    types: str | None = typer.Option(None, "--types", help="Only these envelope types "
                                     "(comma-separated)."),
    as_json: bool = typer.Option(False, "--json", help="Print raw envelope JSON lines; status "
                                 "goes to stderr."),
) -> None:
    """Follow a session live until it ends, resuming after Redis or server restarts."""
    from ._tail import Renderer, TailError, parse_cursor, run_tail

    wanted = frozenset(t.strip() for t in types.split(",") if t.strip()) if types else None
    renderer = Renderer(session, raw=as_json, types=wanted)
    try:
        seq, epoch = parse_cursor(after)
        with renderer:
            anyio.run(lambda: run_tail(session, after=seq, epoch=epoch, url=url, token=token,
                                       renderer=renderer))
    except KeyboardInterrupt:
        renderer.interrupted()
        raise typer.Exit(130) from None
    except (TailError, EventcoreError) as exc:
        renderer.err.print(f"eventcore tail: error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None



def main() -> None:
    app()
