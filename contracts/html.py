"""A browsable HTML page of the AsyncAPI document (the edge serves it at `/contract`).

One self-contained page, no script: the operations, each channel with its address, parameters and
messages, then every message and schema, with `$ref`s as links between them.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; }
code, pre { font: 13px ui-monospace, monospace; }
pre { background: #f6f8fa; padding: .75rem; overflow-x: auto; border-radius: 4px; }
table { border-collapse: collapse; width: 100%; }
td, th { text-align: left; vertical-align: top; padding: .3rem .6rem; border-bottom: 1px solid #ddd; }
section { margin-bottom: 2rem; }
.action { font-weight: 600; text-transform: uppercase; font-size: 12px; }
"""
_REF = re.compile(r'"\$ref": "#/components/(schemas|messages)/([A-Za-z0-9_]+)"')


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-{name}"


def _json(node: Any) -> str:
    """Pretty JSON with every `$ref` to a component a link to it."""
    text = html.escape(json.dumps(node, indent=2, sort_keys=True), quote=False)
    return _REF.sub(
        lambda m: f'"$ref": "<a href="#{_anchor(m[1], m[2])}">#/components/{m[1]}/{m[2]}</a>"', text
    )


def _ref_name(node: dict[str, Any]) -> str:
    return str(node.get("$ref", "")).rsplit("/", 1)[-1]


def _text(value: Any) -> str:
    return html.escape(str(value or ""))


def render(doc: dict[str, Any]) -> str:
    info = doc.get("info", {})
    channels: dict[str, Any] = doc.get("channels", {})
    components = doc.get("components", {})
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_text(info.get('title'))} {_text(info.get('version'))}: the wire contract</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_text(info.get('title'))} {_text(info.get('version'))}</h1>",
        f"<p>{_text(info.get('description'))} AsyncAPI {_text(doc.get('asyncapi'))}; "
        "<a href='/contract/asyncapi.yaml'>the document itself</a>.</p>",
        "<section><h2>Operations</h2><table><tr><th>operation</th><th>action</th><th>channel</th></tr>",
    ]
    for name, op in doc.get("operations", {}).items():
        channel = _ref_name(op.get("channel", {}))
        address = channels.get(channel, {}).get("address") or "(the requester's inbox)"
        out.append(
            f"<tr><td>{_text(name)}</td><td class='action'>{_text(op.get('action'))}</td>"
            f"<td><a href='#{_anchor('channel', channel)}'><code>{_text(address)}</code></a></td></tr>"
        )
    out.append("</table></section><section><h2>Channels</h2>")
    for name, channel in channels.items():
        address = channel.get("address") or "(the requester's inbox)"
        heading = f"<code>{_text(address)}</code> <small>{_text(name)}</small>"
        out.append(f"<h3 id='{_anchor('channel', name)}'>{heading}</h3>")
        out.append(f"<p>{_text(channel.get('description'))}</p>")
        for param, spec in channel.get("parameters", {}).items():
            out.append(f"<p><code>{{{_text(param)}}}</code> {_text(spec.get('description'))}</p>")
        links = [
            f"<a href='#{_anchor('messages', _ref_name(m))}'>{_text(_ref_name(m))}</a>"
            for m in channel.get("messages", {}).values()
        ]
        out.append(f"<p>Messages: {', '.join(links)}</p>")
    out.append("</section><section><h2>Messages</h2>")
    for name, message in components.get("messages", {}).items():
        out.append(f"<h3 id='{_anchor('messages', name)}'>{_text(name)}</h3><pre>{_json(message)}</pre>")
    out.append("</section><section><h2>Schemas</h2>")
    for name, schema in sorted(components.get("schemas", {}).items()):
        out.append(f"<h3 id='{_anchor('schemas', name)}'>{_text(name)}</h3><pre>{_json(schema)}</pre>")
    out.append("</section></body></html>")
    return "\n".join(out)
