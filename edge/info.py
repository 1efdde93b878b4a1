"""`xray-edge info`: what a model file is, what it means, and whether it is the file exported."""

from __future__ import annotations

from xray_edge.model import open_model
from xray_edge.site import resolve_threshold


def describe(model: str, file_name: str | None = None, backend: str = "auto") -> dict:
    """What `info` prints. The threshold is the one classify would use (site.json beside the
    model when it was made for this file), with where it comes from; raises as classify does."""
    loaded = open_model(model, file_name, backend)
    resolved, backend, info = loaded.resolved, loaded.backend, loaded.info
    entry = resolved.entry
    base_source = "manifest" if resolved.manifest else "model file"
    threshold, source = resolve_threshold(resolved.path, loaded.sha256, info.threshold, base_source, None)
    out = {
        "file": str(resolved.path),
        "format": info.format or resolved.path.suffix.lstrip("."),
        "size_bytes": resolved.path.stat().st_size,
        "sha256": loaded.sha256,
        "manifest": ("sha256 matches manifest.json" if resolved.manifest is not None
                     else "no manifest beside it: using the file's embedded metadata"),
        "labels": list(info.labels),
        "threshold": threshold,
        "threshold_source": source,
        f"{base_source.replace(' ', '_')}_threshold": info.threshold,
        "decision": (f"{info.labels[1]} when P({info.labels[1]}) >= threshold, else {info.labels[0]}"
                     if info.binary else "label with the highest probability"),
        "input": {"name": backend.input_name, "shape": list(backend.input_shape),
                  "dtype": str(backend.input_dtype)},
        "quantization": {"input": getattr(backend, "input_quant", None),
                         "output": getattr(backend, "output_quant", None)},
        "preprocessing": info.preprocessing.to_dict(),
        "runtime": f"{backend.name} {backend.version}",
        "synthetic_data": info.synthetic_data,
        "input_gate": _gate(loaded),
    }
    if entry is not None and entry.parity:
        out["parity_at_export"] = entry.parity
    return out


def _gate(loaded) -> dict:
    """The input gate's rules in force, and where they come from."""
    from xray_edge.gate import own_gate, rules_for

    source = "model" if own_gate(loaded) else "defaults (the model records none)"
    return {"source": source, **rules_for(loaded).to_dict()}
