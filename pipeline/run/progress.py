"""The run's progress in the terminal: one line per module from its ``ModuleStatus`` (state, epoch, loss,
upstream version, rate, time left), live under a terminal and printed every 10 s otherwise."""

from __future__ import annotations

import sys
import time

from schemas.status import ModuleStatus


class Progress:
    """One live line per module in a terminal; plain periodic lines otherwise."""

    def __init__(self, names: list[str], enabled: bool = True) -> None:
        self.names, self.enabled = names, enabled
        self.tty = sys.stdout.isatty()
        self._live = None
        self._last_plain = 0.0
        if enabled and self.tty:
            from rich.live import Live

            self._live = Live(refresh_per_second=2, transient=False)
            self._live.start()

    def update(self, statuses: dict[str, ModuleStatus]) -> None:
        if not self.enabled:
            return
        lines = [format_line(statuses.get(n) or ModuleStatus(module=n)) for n in self.names]
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text("\n".join(lines)))
        elif time.monotonic() - self._last_plain > 10:
            self._last_plain = time.monotonic()
            print("\n".join(lines), flush=True)

    def close(self, statuses: dict[str, ModuleStatus]) -> None:
        if self._live is not None:
            self.update(statuses)
            self._live.stop()
        elif self.enabled:
            print("\n".join(format_line(statuses.get(n) or ModuleStatus(module=n)) for n in self.names), flush=True)


def format_line(st: ModuleStatus) -> str:
    total = st.target_epochs or "?"
    loss = f"{st.loss:.4f}" if st.loss is not None else "-"
    rate = f"{st.samples_per_second:,.0f}/s" if st.samples_per_second else "-"
    up = f"v{st.upstream_version}{'F' if st.upstream_final else ''}" if st.upstream_version else "-"
    eta = "-"
    if st.samples_per_second and st.epoch and isinstance(total, int) and st.epoch < total:
        eta = f"{(st.train_seconds / st.epoch) * (total - st.epoch):.0f}s"
    tail = f"  {st.error.splitlines()[0][:80]}" if st.error else ""
    return (f"{st.module:<8} {st.state.value:<16} epoch {st.epoch}/{total:<4} loss {loss:<9} upstream {up:<6} "
            f"{rate:<10} eta {eta}{tail}")
