"""The Extensions tab: what loaded, what failed and why, what is disabled; enable/disable persists for the next start."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.errors import SfumatoError

from .errors import message_for

log = logging.getLogger("sfumato.ui")


@dataclass
class ExtensionRow:
    name: str
    state: str  # "enabled", "failed" or "disabled"
    reason: str
    enabled: bool
    description: str = ""


def _field(item: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(item, dict) and name in item:
            return item[name]
        if hasattr(item, name):
            return getattr(item, name)
    return default


def extension_rows(manager) -> list[ExtensionRow]:
    """The manager's report as rows; tolerant of a manager that is missing or broken."""
    if manager is None:
        return []
    source = None
    for method in ("statuses", "status", "report"):
        if callable(getattr(manager, method, None)):
            source = getattr(manager, method)()
            break
    if source is None:
        return []
    rows = []
    for item in source.values() if isinstance(source, dict) else source:
        name = str(_field(item, "name", default="?"))
        state = str(_field(item, "state", "status", default="enabled"))
        reason = _field(item, "reason", "error", "message", default="") or ""
        enabled = bool(_field(item, "enabled", default=state != "disabled"))
        description = str(_field(item, "description", default="") or "")
        rows.append(ExtensionRow(name, state, str(reason), enabled, description))
    return rows


STATE_LABELS = {"enabled": "✅ loaded", "loaded": "✅ loaded", "failed": "❌ failed", "disabled": "⏸ disabled"}


def _table(rows: list[ExtensionRow]) -> list[list[str]]:
    return [[row.name, STATE_LABELS.get(row.state, row.state), row.reason or row.description] for row in rows]


def build_extensions_tab(studio) -> dict[str, Any]:
    manager = getattr(studio, "extensions", None)
    try:
        rows = extension_rows(manager)
    except Exception as error:  # noqa: BLE001 - this tab must open even when the manager cannot report
        log.exception("could not list extensions")
        rows = []
        gr.Markdown(f"⚠️ Could not list extensions: {type(error).__name__}: {error}")
    gr.Markdown("Extensions live in `extensions/<name>/`. A broken extension is listed here with the reason and skipped; "
                "the rest of Sfumato keeps working. **Enabling or disabling takes effect after a restart.**")
    table = gr.Dataframe(_table(rows), headers=["extension", "state", "reason / description"], interactive=False, wrap=True,
                         elem_id="extensions_table")
    enabled = gr.CheckboxGroup([row.name for row in rows], value=[row.name for row in rows if row.enabled],
                               label="Enabled extensions", elem_id="extensions_enabled")
    apply = gr.Button("Save (applies after restart)", elem_id="extensions_apply")
    status = gr.Markdown("", elem_id="extensions_status")

    def save(chosen: list[str]):
        chosen = set(chosen or [])
        changed = []
        try:
            for row in extension_rows(manager):
                want = row.name in chosen
                if want != row.enabled:
                    manager.set_enabled(row.name, want)
                    changed.append(f"{row.name} {'enabled' if want else 'disabled'}")
        except SfumatoError as error:
            gr.Warning(message_for(error))
            return gr.skip(), f"⚠️ {message_for(error)}"
        if not changed:
            return gr.skip(), "Nothing changed."
        return _table(extension_rows(manager)), "Saved: " + ", ".join(changed) + ". Restart Sfumato to apply."

    apply.click(save, enabled, [table, status], api_visibility="private")
    return {"table": table, "enabled": enabled}
