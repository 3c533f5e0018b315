"""rich progress for a build: slides done/failed and views/s; silent when disabled (other ranks)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _columns() -> tuple:
    """Name, bar, done/total, the task's `rate` text, elapsed and remaining time."""
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn())


class BuildProgress:
    """Two bars: slides (ok/failed) and views embedded, with views/s and tiles/s."""

    def __init__(self, enabled: bool, n_slides: int, console: Console | None = None,
                 views_per_tile: int = 1):
        self.enabled = enabled
        self.views_per_tile = views_per_tile
        self.ok = self.failed = 0
        self._seen: set[str] = set()
        if not enabled:
            self.progress = None
            return
        self.progress = Progress(*_columns(), console=console or Console(stderr=True), transient=False)
        self.slides = self.progress.add_task("slides", total=n_slides, rate="")
        self.views = self.progress.add_task("views", total=None, rate="", start=False)

    def __enter__(self):
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def slide_done(self, slide_id: str, ok: bool, skipped: bool = False, error: str | None = None) -> None:
        if slide_id in self._seen and ok:
            return
        if slide_id not in self._seen:
            self._seen.add(slide_id)
            if self.progress:
                self.progress.advance(self.slides)
        if ok:
            self.ok += 1
        else:
            self.failed += 1
            if self.progress:
                self.progress.console.print(f"[yellow]slide {slide_id} failed:[/] {error}")
        if self.progress:
            self.progress.update(self.slides, rate=f"ok {self.ok} failed {self.failed}")

    def slide_planned(self, slide_id: str) -> None:
        """A slide's tiles are chosen; the build counts a slide once its views are embedded."""

    def start_views(self, total: int) -> None:
        if self.progress:
            self.progress.update(self.views, total=total)
            self.progress.start_task(self.views)

    def views_done(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.views, n)
            task = self.progress.tasks[self.views]
            # the mean since the teacher pass began: the figure the summary and `cache info` report
            speed = task.completed / task.elapsed if task.elapsed else 0.0
            rate = f"{speed:.1f} views/s ({speed / self.views_per_tile:.1f} tiles/s)" if speed else ""
            self.progress.update(self.views, rate=rate)


class PlanProgress:
    """One bar for `g2l cache plan`: slides whose tissue has been detected (ok/failed)."""

    def __init__(self, enabled: bool, n_slides: int, console: Console | None = None):
        self.ok = self.failed = 0
        self.progress = Progress(*_columns(), console=console or Console(stderr=True), disable=not enabled)
        self.slides = self.progress.add_task("slides planned", total=n_slides, rate="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def slide_planned(self, slide_id: str) -> None:
        self.ok += 1
        self._advance()

    def slide_done(self, slide_id: str, ok: bool, skipped: bool = False, error: str | None = None) -> None:
        if not ok:  # the plan phase reports failures only; ok slides come through slide_planned
            self.failed += 1
            self._advance()

    def _advance(self) -> None:
        self.progress.update(self.slides, advance=1, rate=f"ok {self.ok} failed {self.failed}")
